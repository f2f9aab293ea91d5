"""The SLURM recipes in examples/recipes/: their layouts against the real models' configs (fast), and
every recipe's sbatch scripts run end to end on CPU (`bash convert.sbatch`, `bash train.sbatch ...`)
with a fake ``srun`` that starts the tasks on this host with the variables srun sets, and tiny random
stand-ins of the same families under the model names the recipes expect."""

import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from harness import ROOT

from megatron_minillm.config import load_config
from megatron_minillm.models import architecture_from_dict, check_layout, padded_vocab_size
from megatron_minillm.parallel import ParallelLayout

RECIPES = ROOT / "examples" / "recipes"
DATA = ROOT / "examples" / "data"

# ------------------------------------------------------------------------------------------------
# The real models: the config.json fields our architecture mapping reads, as published on the Hub.

_GPT2 = {"model_type": "gpt2", "vocab_size": 50257, "n_positions": 1024, "activation_function": "gelu_new"}
_OPT = {
    "model_type": "opt",
    "vocab_size": 50272,
    "max_position_embeddings": 2048,
    "activation_function": "relu",
    "do_layer_norm_before": True,
}
_LLAMA = {
    "model_type": "llama",
    "vocab_size": 32000,
    "max_position_embeddings": 2048,
    "hidden_act": "silu",
    "rms_norm_eps": 1e-6,
}
HF_CONFIGS = {
    "gpt2-xl": _GPT2 | {"n_embd": 1600, "n_layer": 48, "n_head": 25},
    "gpt2": _GPT2 | {"n_embd": 768, "n_layer": 12, "n_head": 12},
    "gpt2-medium": _GPT2 | {"n_embd": 1024, "n_layer": 24, "n_head": 16},
    "gpt2-large": _GPT2 | {"n_embd": 1280, "n_layer": 36, "n_head": 20},
    "opt-13b": _OPT
    | {
        "hidden_size": 5120,
        "ffn_dim": 20480,
        "num_hidden_layers": 40,
        "num_attention_heads": 40,
        "word_embed_proj_dim": 5120,
    },
    "opt-1.3b": _OPT
    | {
        "hidden_size": 2048,
        "ffn_dim": 8192,
        "num_hidden_layers": 24,
        "num_attention_heads": 32,
        "word_embed_proj_dim": 2048,
    },
    "llama-13b": _LLAMA
    | {
        "hidden_size": 5120,
        "intermediate_size": 13824,
        "num_hidden_layers": 40,
        "num_attention_heads": 40,
        "num_key_value_heads": 40,
    },
    "llama-7b": _LLAMA
    | {
        "hidden_size": 4096,
        "intermediate_size": 11008,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 32,
    },
    "llama-2-70b": _LLAMA
    | {
        "hidden_size": 8192,
        "intermediate_size": 28672,
        "num_hidden_layers": 80,
        "num_attention_heads": 64,
        "num_key_value_heads": 8,
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5,
    },
    "llama-2-7b": _LLAMA
    | {
        "hidden_size": 4096,
        "intermediate_size": 11008,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 32,
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5,
    },
}
# recipe -> (teacher, students, family data directory)
RECIPE_MODELS = {
    "gpt2-xl_to_gpt2": ("gpt2-xl", ("gpt2", "gpt2-medium", "gpt2-large"), "gpt2"),
    "opt-13b_to_opt-1.3b": ("opt-13b", ("opt-1.3b",), "opt"),
    "llama-13b_to_llama-7b": ("llama-13b", ("llama-7b",), "llama"),
    "llama-70b_to_llama-7b": ("llama-2-70b", ("llama-2-7b",), "llama"),
}
STAGE_FILES = (
    "convert.sbatch",
    "train.sbatch",
    "evaluate.sbatch",
    "sft_teacher.yaml",
    "sft.yaml",
    "minillm.yaml",
    "README.md",
)


def _directives(script: Path) -> dict[str, str]:
    return dict(re.findall(r"^#SBATCH --([\w-]+)=(\S+)", script.read_text(), flags=re.M))


def _default(script: Path, name: str) -> str:
    """The default of ``NAME=${NAME:-default}`` in a script."""
    match = re.search(rf"^{name}=\$\{{{name}:-([^}}]*)\}}", script.read_text(), flags=re.M)
    assert match, f"{script}: no {name}=${{{name}:-...}}"
    return match.group(1).strip('"')


@pytest.mark.parametrize("recipe", sorted(RECIPE_MODELS))
def test_recipe_layouts_fit_the_real_models(recipe):
    """Every stage's TP x PP divides both models' heads, KV heads, FFN and layers at the node count
    of the sbatch file; teacher and student get the same padded vocabulary; batches divide."""
    folder = RECIPES / recipe
    assert all((folder / name).is_file() for name in STAGE_FILES), sorted(p.name for p in folder.iterdir())
    teacher_name, students, _ = RECIPE_MODELS[recipe]
    arch = {name: architecture_from_dict(HF_CONFIGS[name]) for name in (teacher_name, *students)}

    train = folder / "train.sbatch"
    sbatch = _directives(train)
    assert sbatch["ntasks-per-node"] == sbatch["gpus-per-node"] == "8", sbatch  # one task per GPU
    world = int(sbatch["nodes"]) * 8
    text = train.read_text()
    assert "torchrun" not in text and "MASTER_ADDR" not in text and "MASTER_PORT" not in text
    assert re.search(r"^srun python -m megatron_minillm\.train ", text, flags=re.M), "srun must start the trainer"

    for config, models in (
        ("sft_teacher.yaml", [teacher_name]),
        ("sft.yaml", students),
        ("minillm.yaml", [teacher_name, *students]),
    ):
        cfg = load_config(str(folder / config))
        t, opt, rollout, m = cfg.training, cfg.optimizer, cfg.rollout, cfg.minillm
        layout = ParallelLayout(tp=cfg.parallel.tp, pp=cfg.parallel.pp, world_size=world)
        teacher_layout = ParallelLayout(*cfg.parallel.teacher_layout, world_size=world)  # its own, or the student's
        for name in models:
            own = name == teacher_name and config == "minillm.yaml"
            check_layout(arch[name], *((teacher_layout.tp, teacher_layout.pp) if own else (layout.tp, layout.pp)))
        assert t.global_batch_size % (t.micro_batch_size * layout.dp) == 0, (config, layout)
        assert t.dtype == "bf16" and t.max_length == 512 and t.max_prompt_length == 256
        if cfg.algorithm == "minillm":
            assert rollout.batch_size == 256 and t.global_batch_size == 64 and m.ppo_epochs == 4
            assert rollout.batch_size % layout.dp == 0 and rollout.batch_size % t.global_batch_size == 0
            # LMOps: 5000 optimizer steps of 64 samples, lr 5e-6 after 100 warmup steps, cosine for LLaMA
            steps = t.train_iters * m.ppo_epochs * rollout.batch_size // t.global_batch_size
            assert 4950 <= steps <= 5050 and opt.lr == 5e-6 and opt.lr_warmup_iters == 100
            assert opt.lr_decay_style == ("cosine" if "llama" in recipe else "constant")
            assert (rollout.mix_alpha, cfg.kd.kd_ratio, m.lm_coef, m.reward_scaling, m.length_norm) == (
                0.2,
                0.5,
                1.0,
                0.5,
                True,
            )
        else:
            assert cfg.algorithm == "sft" and t.global_batch_size == 32 and opt.weight_decay == 1e-2
            assert opt.lr_decay_style == "cosine" and opt.lr_warmup_iters == 0

    # Conversion: one TP for both models (same padded vocabulary), pipeline stages dividing the layers.
    convert = folder / "convert.sbatch"
    tp = int(_default(convert, "TP"))
    padded = {padded_vocab_size(arch[name].vocab_size, tp) for name in arch}
    assert len(padded) == 1, padded
    for config in ("sft_teacher.yaml", "sft.yaml", "minillm.yaml"):
        parallel = load_config(str(folder / config)).parallel
        for split in (parallel.tp, parallel.teacher_layout[0]):
            assert next(iter(padded)) % split == 0, (config, split)
    for name, tasks in (
        (teacher_name, _default(convert, "TEACHER_TASKS")),
        *((s, _default(convert, "STUDENT_TASKS")) for s in students),
    ):
        check_layout(arch[name], tp, int(tasks) // tp)
    evaluate = folder / "evaluate.sbatch"
    for name in students:
        check_layout(arch[name], 1, int(_default(evaluate, "EXPORT_TASKS")))
    eval_tp = int(_default(evaluate, "TP"))
    for name in arch:
        check_layout(arch[name], eval_tp, 1)


# The recipes whose MiniLLM layout (student and teacher, sequence parallelism, micro-batch) is the
# memory planner's recommendation for their nodes of 8 x 80 GB GPUs.
PLANNED = ("llama-70b_to_llama-7b", "opt-13b_to_opt-1.3b")


@pytest.mark.parametrize("recipe", PLANNED)
def test_recipe_layout_is_the_planners_recommendation(recipe):
    """``tools/plan_memory.py``'s search (``planning.search_layouts``) on the recipe's nodes, with its
    minillm.yaml and the padded vocabulary of its conversion, recommends the layout the YAML sets."""
    from megatron_minillm.planning import PlanConfig, search_layouts

    folder = RECIPES / recipe
    teacher_name, (student_name,), _ = RECIPE_MODELS[recipe]
    teacher, student = (architecture_from_dict(HF_CONFIGS[name]) for name in (teacher_name, student_name))
    cfg = load_config(str(folder / "minillm.yaml"))
    padded = padded_vocab_size(student.vocab_size, int(_default(folder / "convert.sbatch", "TP")))
    plan = PlanConfig.from_train(cfg, padded_vocab=padded)
    nodes = int(_directives(folder / "train.sbatch")["nodes"])
    best = search_layouts(teacher, student, plan, nodes=nodes, gpus_per_node=8, gpu_memory_bytes=80 * 2**30)[0]
    p, t = cfg.parallel, cfg.training
    recommended = (best.tp, best.pp, best.teacher_tp, best.teacher_pp, best.sequence_parallel, best.micro_batch_size)
    assert recommended == (p.tp, p.pp, *p.teacher_layout, p.sequence_parallel, t.micro_batch_size), best
    assert (best.teacher_tp, best.teacher_pp) != (best.tp, best.pp)  # the teacher on its own layout


# ------------------------------------------------------------------------------------------------
# The launch paths on CPU.

ZYGOTE = r'''
"""A warm interpreter for the fake srun: imports the heavy modules once, then forks one child per task
(what `python` would run, with the task's argv, environment, cwd and standard streams)."""
import atexit, json, os, runpy, socket, sys, traceback

for name in ("megatron_minillm.train", "megatron_minillm.checkpoint.convert", "megatron_minillm.data",
             "megatron_minillm.evaluation.evaluate", "transformers"):
    __import__(name)
server = socket.socket(socket.AF_UNIX)
server.bind(sys.argv[1])
server.listen(64)
server.settimeout(0.5)
print("ready", flush=True)


def run_task(conn, request, fds):
    for target, fd in zip((0, 1, 2), fds):
        os.dup2(fd, target)
        os.close(fd)
    sys.stdout = os.fdopen(1, "w", buffering=1, closefd=False)
    sys.stderr = os.fdopen(2, "w", buffering=1, closefd=False)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    argv, code = request["argv"], 0
    try:
        if argv[0] == "-m":
            sys.argv = argv[1:]
            runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
        else:
            sys.argv = list(argv)
            sys.path.insert(0, os.path.dirname(os.path.abspath(argv[0])))
            runpy.run_path(argv[0], run_name="__main__")
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else int(exit_.code is not None)
        if not isinstance(exit_.code, (int, type(None))):
            print(exit_.code, file=sys.stderr)
    except BaseException:
        traceback.print_exc()
        code = 1
    try:
        atexit._run_exitfuncs()  # as at interpreter exit (multiprocessing stops its helper processes)
    except BaseException:
        traceback.print_exc()
    sys.stdout.flush()
    sys.stderr.flush()
    conn.sendall(f"exit {code}\n".encode())
    os._exit(code)


while True:
    try:
        while os.waitpid(-1, os.WNOHANG)[0]:
            pass
    except ChildProcessError:
        pass
    try:
        conn, _ = server.accept()
    except socket.timeout:
        continue
    conn.settimeout(None)
    message, fds, _, _ = socket.recv_fds(conn, 1 << 20, 3)
    pid = os.fork()
    if pid == 0:
        server.close()
        run_task(conn, json.loads(message.decode()), fds)
    for fd in fds:
        os.close(fd)
    conn.sendall(f"pid {pid}\n".encode())
    conn.close()
'''

FAKE_SRUN = r'''
"""srun for a machine without SLURM: starts the step's tasks on this host with the variables srun sets
(SLURM_PROCID, SLURM_LOCALID, SLURM_NODEID, SLURM_NTASKS, SLURM_NNODES, ...) from the allocation's
(SLURM_NTASKS, SLURM_NNODES, SLURM_JOB_NODELIST, SLURM_JOB_ID); refuses a step larger than the
allocation; kills the other tasks when one fails (--kill-on-bad-exit). `python ...` tasks are forked
from the warm interpreter at FAKE_SRUN_ZYGOTE when set, other commands are executed."""
import json, os, selectors, signal, socket, subprocess, sys

args, opts = sys.argv[1:], {}
while args and args[0].startswith("-"):
    flag = args.pop(0)
    name, eq, value = flag.partition("=")
    if name in ("-N", "-n") and not eq:
        value = args.pop(0)
    opts[name] = value
env = dict(os.environ)
allocated, allocated_nodes = int(env["SLURM_NTASKS"]), int(env["SLURM_NNODES"])
nodes = int(opts.get("--nodes", opts.get("-N", allocated_nodes)))
if "--ntasks" in opts or "-n" in opts:
    ntasks = int(opts.get("--ntasks", opts.get("-n")))
elif "--ntasks-per-node" in opts:
    ntasks = nodes * int(opts["--ntasks-per-node"])
else:
    ntasks = allocated
if ntasks > allocated or nodes > allocated_nodes:
    sys.exit(f"srun: error: Unable to create step: {ntasks} tasks on {nodes} nodes exceed the allocation "
             f"({allocated} tasks on {allocated_nodes} nodes)")
per_node = -(-ntasks // nodes)
zygote = env.get("FAKE_SRUN_ZYGOTE")
tasks = []
for rank in range(ntasks):
    task_env = env | {"SLURM_PROCID": str(rank), "SLURM_LOCALID": str(rank % per_node),
                      "SLURM_NODEID": str(rank // per_node), "SLURM_NTASKS": str(ntasks),
                      "SLURM_NPROCS": str(ntasks), "SLURM_NNODES": str(nodes), "SLURM_NTASKS_PER_NODE": str(per_node),
                      "SLURM_STEP_NUM_TASKS": str(ntasks), "SLURM_STEP_NUM_NODES": str(nodes), "SLURM_STEP_ID": "0"}
    if zygote and os.path.basename(args[0]).startswith("python"):
        conn = socket.socket(socket.AF_UNIX)
        conn.connect(zygote)
        request = {"argv": args[1:], "env": task_env, "cwd": os.getcwd()}
        socket.send_fds(conn, [json.dumps(request).encode()], [0, 1, 2])
        tasks.append(conn)
    else:
        tasks.append(subprocess.Popen(args, env=task_env))

selector = selectors.DefaultSelector()
pids, codes, buffers = {}, {}, {}
for i, task in enumerate(tasks):
    if isinstance(task, subprocess.Popen):
        pids[i] = task.pid
    else:
        selector.register(task, selectors.EVENT_READ, i)
        buffers[i] = b""
open_ = set(range(len(tasks)))  # a task's connection closes when its process has exited: srun waits for that
while open_ and not any(codes.values()):
    for i, task in enumerate(tasks):
        if isinstance(task, subprocess.Popen) and i in open_ and task.poll() is not None:
            codes[i] = task.returncode
            open_.discard(i)
    for key, _ in selector.select(timeout=0.2):
        i, data = key.data, key.fileobj.recv(4096)
        if not data:
            selector.unregister(key.fileobj)
            open_.discard(i)
            codes.setdefault(i, 1)  # closed with no exit line: the task died
            continue
        *lines, buffers[i] = (buffers[i] + data).split(b"\n")
        for line in lines:
            kind, value = line.decode().split()
            if kind == "pid":
                pids[i] = int(value)
            else:
                codes[i] = int(value)
for i, pid in pids.items():  # --kill-on-bad-exit: the others are blocked in a collective
    if i in open_:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
sys.exit(next((c for c in codes.values() if c), 0))
'''


def _slurm_job_id_for_free_port() -> str:
    """A job id whose derived MASTER_PORT (20000 + id % 20000) is free now and below the kernel's
    ephemeral range (no outgoing connection takes it while the job's steps come and go)."""
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    for port in random.Random(os.getpid()).sample(range(20000, min(low, 40000)), 200):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        return str(port - 20000)
    raise RuntimeError("no free port in [20000, ephemeral range)")


def _tiny_hf(
    family: str, out: Path, tokenizer_dir: Path, layers: int, heads: int, hidden: int, kv_heads: int = 0, seed: int = 0
) -> None:
    """A random-init HF model of ``family`` with the test tokenizer, saved with its tokenizer."""
    import torch
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
    ids = dict(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    if family == "gpt2":
        config = transformers.GPT2Config(n_embd=hidden, n_layer=layers, n_head=heads, n_positions=256, **ids)
    elif family == "opt":
        config = transformers.OPTConfig(
            hidden_size=hidden,
            ffn_dim=2 * hidden,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            max_position_embeddings=256,
            word_embed_proj_dim=hidden,
            **ids,
        )
    else:
        config = transformers.LlamaConfig(
            hidden_size=hidden,
            intermediate_size=2 * hidden,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=kv_heads or heads,
            max_position_embeddings=256,
            tie_word_embeddings=False,
            **ids,
        )
    torch.manual_seed(seed)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(out)
    tokenizer.save_pretrained(out)


# Stand-ins under the names the recipes expect: (family, layers, heads, hidden, KV heads). Teachers and
# students keep their families' head-count relations: GPT-2 XL's 5 heads vs 4 leave only TP=1, as 25 vs
# 12/16/20 do. The LLaMA teachers share one stand-in with grouped-query attention (as LLaMA-2-70B) and
# the LLaMA students another: the second LLaMA recipe finds both converted.
STAND_INS = {
    "gpt2-xl": ("gpt2", 2, 5, 40, 0),
    "gpt2": ("gpt2", 2, 4, 32, 0),
    "opt-13b": ("opt", 2, 4, 32, 0),
    "opt-1.3b": ("opt", 2, 2, 32, 0),
    "llama-13b": ("llama", 2, 4, 32, 2),
    "llama-7b": ("llama", 2, 4, 32, 0),
}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """Tiny models and raw data under MODEL_ROOT / DATA_ROOT, the fake srun on PATH, a one-node
    allocation of 2 tasks in the environment, and the warm interpreter the fake srun forks from."""
    from tokenizer_zoo import hf_tokenizer_dir

    root = tmp_path_factory.mktemp("cluster")
    models, raw, bin_dir = root / "models", root / "data" / "raw", root / "bin"
    raw.mkdir(parents=True)
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(f"#!{sys.executable}\n{FAKE_SRUN}")
    (bin_dir / "srun").chmod(0o755)
    assert shutil.which("scontrol") is None  # our built-in node-list parser runs, as intended here
    socket_path = root / "zygote.sock"
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
        and not k.startswith("SLURM_")
    }
    env |= {
        "PATH": f"{bin_dir}:{Path(sys.executable).parent}:{env['PATH']}",
        "OMP_NUM_THREADS": "1",
        "REPO": str(ROOT),
        "MODEL_ROOT": str(models),
        "CKPT_ROOT": str(root / "ckpt"),
        "DATA_ROOT": str(root / "data"),
        "EXPORT_ROOT": str(root / "export"),
        "EVAL_ROOT": str(root / "eval"),
        "PREPROCESS_WORKERS": "1",
        "DOLLY_VALID": "4",
        # what sbatch puts in the batch script's environment for --nodes=1 --ntasks-per-node=2
        "SLURM_JOB_ID": _slurm_job_id_for_free_port(),
        "SLURM_JOB_NODELIST": "localhost",
        "SLURM_NNODES": "1",
        "SLURM_JOB_NUM_NODES": "1",
        "SLURM_NTASKS": "2",
        "SLURM_NTASKS_PER_NODE": "2",
        "SLURM_SUBMIT_DIR": str(ROOT),
        "FAKE_SRUN_ZYGOTE": str(socket_path),
    }
    # The warm interpreter imports while the models are built.
    zygote = subprocess.Popen(
        [sys.executable, "-c", ZYGOTE, str(socket_path)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    for seed, (name, (family, layers, heads, hidden, kv)) in enumerate(STAND_INS.items()):
        _tiny_hf(family, models / name, hf_tokenizer_dir(), layers, heads, hidden, kv, seed)
    rows = [json.loads(line) for line in (DATA / "t0_train_600.jsonl").read_text().splitlines()]
    dolly = [
        {"instruction": r["prompt"][-120:], "context": "", "response": r["completion"][:200], "category": "qa"}
        for r in rows[:40]
    ]
    (raw / "databricks-dolly-15k.jsonl").write_text("".join(json.dumps(r) + "\n" for r in dolly))
    passages = (DATA / "t0_passages_300.jsonl").read_text().splitlines()[:12]
    for name in ("openwebtext.jsonl", "roberta_corpus.jsonl"):
        (raw / name).write_text("\n".join(passages) + "\n")
    try:
        assert zygote.stdout.readline().strip() == "ready"
        yield {"root": root, "env": env}
    finally:
        os.killpg(zygote.pid, signal.SIGKILL)  # the warm interpreter and anything a task left behind
        zygote.wait()


def _sbatch(cluster: dict, recipe: str, script: str, *args: str, **env: str) -> subprocess.CompletedProcess:
    """`bash` the sbatch file as the batch step would run it (the #SBATCH lines are comments)."""
    start = time.perf_counter()
    done = subprocess.run(
        ["bash", str(RECIPES / recipe / script), *args],
        cwd=ROOT,
        env=cluster["env"] | env,
        capture_output=True,
        text=True,
        timeout=400,
    )
    print(f"{recipe}/{script} {' '.join(args)}: {time.perf_counter() - start:.1f} s")
    assert done.returncode == 0, (
        f"{recipe}/{script} {args} exited {done.returncode}\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
    )
    return done


# Small runs: 2 processes, 1 iteration of 4 rollouts; the layout is set per recipe. max_prompt_length
# covers the stand-in data's longest prompt (146 tokens): the trainer refuses to cut prompts.
TINY = (
    "training.train_iters=1 training.max_prompt_length=160 training.max_length=168 training.global_batch_size=4 "
    "training.micro_batch_size=2 training.dtype=fp32 checkpoint.save_interval=0"
)
TINY_MINILLM = (
    TINY + " rollout.batch_size=4 rollout.micro_batch_size=4 minillm.ppo_epochs=1 optimizer.lr_warmup_iters=0"
)


def _iterations(stdout: str) -> list[str]:
    return [line for line in stdout.splitlines() if line.startswith("iteration")]


def test_recipes_launch_through_their_sbatch_files(cluster):
    ckpt, data = cluster["root"] / "ckpt", cluster["root"] / "data"

    # GPT-2: the whole chain. Conversion streamed over 2 pipeline stages; SFT; MiniLLM from the SFT run's
    # last checkpoint and the converted teacher; evaluation and the export back to HF. TP=1 x DP=2.
    recipe = "gpt2-xl_to_gpt2"
    _sbatch(cluster, recipe, "convert.sbatch", STUDENTS="gpt2", TEACHER_TASKS="2", STUDENT_TASKS="1")
    assert json.loads((ckpt / "gpt2-xl" / "minillm_checkpoint.json").read_text())["padded_vocab_size"] == 640
    sft = _sbatch(cluster, recipe, "train.sbatch", "sft", STUDENT_SIZE="120M", EXTRA_ARGS=TINY)
    assert len(_iterations(sft.stdout)) == 1 and (ckpt / "gpt2-sft" / "iter_0000001" / "model").is_dir()
    teacher = str(ckpt / "gpt2-xl")
    run = _sbatch(cluster, recipe, "train.sbatch", "minillm", TEACHER_CKPT=teacher, EXTRA_ARGS=TINY_MINILLM)
    assert len(_iterations(run.stdout)) == 1 and (ckpt / "minillm-gpt2" / "latest").read_text().strip() == "1"
    _sbatch(
        cluster,
        recipe,
        "evaluate.sbatch",
        TEACHER_CKPT=teacher,
        EVAL_SETS="dolly",
        EXPORT_TASKS="1",
        EVAL_ARGS="--seeds 1 --max-new-tokens 4",
    )
    results = json.loads((cluster["root"] / "eval" / "gpt2-xl_to_gpt2" / "dolly" / "results.json").read_text())
    assert [m["name"] for m in results["models"]] == ["GPT-2 XL SFT", "SFT 120M", "MiniLLM 120M"]
    assert (cluster["root"] / "export" / "minillm-gpt2" / "config.json").is_file()

    # The other families share the data (same test tokenizer): only their models are converted.
    for family in ("opt", "llama"):
        (data / family).symlink_to(data / "gpt2")
    # OPT: converted at TP=1 (vocabulary 600 padded to 640); the student at TP=1 x DP=2, the teacher on
    # its own TP=2 x DP=1 (the recipe's shape: the student data-parallel, the teacher tensor-parallel).
    _sbatch(cluster, "opt-13b_to_opt-1.3b", "convert.sbatch", TP="1", TEACHER_TASKS="1", STUDENT_TASKS="1")
    run = _sbatch(
        cluster,
        "opt-13b_to_opt-1.3b",
        "train.sbatch",
        "minillm",
        TEACHER_CKPT=str(ckpt / "opt-13b"),
        SFT_CKPT=str(ckpt / "opt-1.3b"),
        EXTRA_ARGS=TINY_MINILLM + " parallel.tp=1 parallel.teacher_tp=2 parallel.teacher_pp=1",
    )
    assert len(_iterations(run.stdout)) == 1 and (ckpt / "minillm-opt-1.3b" / "iter_0000001").is_dir()
    # LLaMA-13B -> 7B at PP=2; LLaMA-2-70B (grouped-query attention) -> 7B on the same stand-ins, the student
    # at TP=1 x DP=2 and the teacher on its own TP=2 x DP=1.
    _sbatch(cluster, "llama-13b_to_llama-7b", "convert.sbatch", TP="1", TEACHER_TASKS="1", STUDENT_TASKS="1")
    run = _sbatch(
        cluster,
        "llama-13b_to_llama-7b",
        "train.sbatch",
        "minillm",
        TEACHER_CKPT=str(ckpt / "llama-13b"),
        SFT_CKPT=str(ckpt / "llama-7b"),
        EXTRA_ARGS=TINY_MINILLM + " parallel.tp=1 parallel.pp=2",
    )
    assert len(_iterations(run.stdout)) == 1 and (ckpt / "minillm-llama-7b" / "iter_0000001").is_dir()
    (ckpt / "llama-2-70b").symlink_to(ckpt / "llama-13b")
    (ckpt / "llama-2-7b").symlink_to(ckpt / "llama-7b")
    done = _sbatch(cluster, "llama-70b_to_llama-7b", "convert.sbatch")  # defaults (TP=8 ...): nothing left to run
    assert "llama-2-70b exists, kept" in done.stdout and "llama-2-7b exists, kept" in done.stdout
    run = _sbatch(
        cluster,
        "llama-70b_to_llama-7b",
        "train.sbatch",
        "minillm",
        TEACHER_CKPT=str(ckpt / "llama-2-70b"),
        SFT_CKPT=str(ckpt / "llama-2-7b"),
        EXTRA_ARGS=TINY_MINILLM + " parallel.tp=1 parallel.pp=1 parallel.teacher_tp=2 parallel.teacher_pp=1",
    )
    assert len(_iterations(run.stdout)) == 1 and (ckpt / "minillm-llama-2-7b" / "iter_0000001").is_dir()
