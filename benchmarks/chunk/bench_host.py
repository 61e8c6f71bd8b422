"""Host time of a chunk step: what ``KVCache`` costs on the CPU per ``begin_chunk``, ``attend`` and ``end_chunk``.

    python -m benchmarks host                          # this tree, 3 rounds (~2 min on 2 cores)
    python -m benchmarks host --baseline 2824b31       # this tree against a commit, interleaved (~4 min)

The cache runs on ``device="meta"``: tensors without data, every op dispatched to its fake (meta) kernel, so
nothing is computed and what is timed is the host work alone: planning, argument checks, index uploads,
Python and op dispatch. That is the time a GPU step cannot hide when the device is fast (a captured CUDA
graph removes it; eager runs pay it at every call). The ops' real host launchers (backend resolution, Triton
/ CUDA launch) do not run on meta tensors, so they are not part of these numbers.

Per policy (``dense`` = ``DenseWindow(window=21)``, ``relax`` = ``RelaxMemory()``, ``pack`` = ``PackMemory()``) and
attention mode (``window``, ``segments``, ``per_call``), at Wan2.1-1.3B shapes (``common.SHAPES["wan"]``: 30
layers x 5 passes, bf16), backend ``auto``: a fresh cache runs ``warmup`` chunks (default: the first chunk from
which the policy's plans keep their shapes, found with the policy's host planner: dense 6, relax 4, pack 67),
then ``--chunks`` steady chunks, every call timed with ``time.perf_counter_ns`` (wall) and ``attend`` and
``begin_chunk`` also with ``time.thread_time_ns`` (the thread's CPU time, which leaves out the milliseconds a
call spends preempted on a loaded machine). Reported over the steady chunks of every round: median, p10 and
p90 in microseconds per ``attend`` (also split into a layer's first pass, where the selection and the window
staging run, and the later passes), per ``begin_chunk``, per ``end_chunk`` and per whole chunk.

Only the public API is used (``import relaxkv_kernels as rk``), so the script measures older commits too:
``--baseline REV`` adds a temporary detached ``git worktree`` of REV. Each tree is measured by its own worker
subprocess whose ``PYTHONPATH`` starts with the tree (checked through ``rk.__file__``), behind a folder that holds
only this tree's ``benchmarks`` (the measuring code is this tree's for every tree). Per policy/mode, both
workers build a fresh cache and run its warm-up, then take turns chunk by chunk (this, REV, REV, this, ...; the
idle one waits on its pipe), so both trees see the same machine load within ~0.1 s; ``--rounds`` repeats that
with fresh caches. Host time is noisy: compare trees and modes within one run, not across runs.

Writes JSON + CSV (device ``meta/host``, CPU model, python / torch versions, commit of each tree, every number) at
``--out`` (default ``benchmarks/results/host_<shape>_cpu.json``) and prints the table last: with ``--baseline``,
median us per attend and per begin_chunk of this tree against REV and their ratio (> 1: this tree is slower).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import torch

from benchmarks import common

POLICIES = ("dense", "relax", "pack")
MODES = ("window", "segments", "per_call")
FALLBACK_WARMUP = {"dense": 6, "relax": 4, "pack": 67}  # Wan shapes, where a tree's planner cannot be searched
METRICS = ("attend", "attend_cpu", "attend_first", "attend_later", "begin_chunk", "begin_chunk_cpu", "end_chunk",
           "chunk")
COMPARED = ("attend", "attend_cpu", "begin_chunk", "begin_chunk_cpu", "end_chunk", "chunk")
PROTOCOL = "@bench_host "  # prefix of the worker's messages on its stdout
LABEL = "host time on meta tensors (no kernels run): CPU time, not a GPU measurement"


# ----------------------------------------------------------------------------------------------------
# worker: one tree (a subprocess with the tree first on PYTHONPATH)


def make_policy(rk, name: str):
    return {"dense": lambda: rk.DenseWindow(window=21), "relax": rk.RelaxMemory, "pack": rk.PackMemory}[name]()


def plan_shape(plan) -> tuple | None:
    """:func:`common.plan_shape`, or None where a tree's plans do not have its fields."""
    try:
        return common.plan_shape(plan)
    except (AttributeError, TypeError):
        return None


def steady_chunk(policy, height: int, width: int) -> int | None:
    """:func:`common.steady_chunk`, or None where a tree's planner or plans cannot be read that way."""
    try:
        return common.steady_chunk(policy, height, width)
    except (AttributeError, TypeError, RuntimeError):
        return None


class Session:
    """One policy/mode of one tree: a fresh cache on meta tensors run through its warm-up, then timed chunk by chunk.

    Every call is timed with ``perf_counter_ns`` (wall); ``attend`` and ``begin_chunk`` also with ``thread_time_ns``
    (CPU, ~0.6 us a read, read outside the wall interval so it does not inflate the wall times).
    """

    def __init__(self, rk, shape: common.Shape, policy_name: str, mode: str, warmup: int):
        policy = make_policy(rk, policy_name)
        self.shape = shape
        self.cache = rk.KVCache(policy, num_layers=shape.layers, batch=shape.batch, num_heads=shape.heads,
                                head_dim=shape.head_dim, height=shape.height, width=shape.width,
                                dtype=shape.torch_dtype, device="meta", backend="auto", attention=mode)
        self.q = torch.empty(shape.batch, policy.chunk_frames * shape.frame_tokens, shape.heads, shape.head_dim,
                             dtype=shape.torch_dtype, device="meta")
        self.k, self.v = torch.empty_like(self.q), torch.empty_like(self.q)
        self.samples = {name: [] for name in METRICS}
        self.plans = set()
        for _ in range(warmup):
            self.chunk(record=False)

    def chunk(self, record: bool = True) -> None:
        cache, q, k, v, layers = self.cache, self.q, self.k, self.v, self.shape.layers
        clock, cpu = time.perf_counter_ns, time.thread_time_ns
        with torch.no_grad():
            c0 = cpu()
            t0 = clock()
            plan = cache.begin_chunk()
            t1 = clock()
            c1 = cpu()
            calls, calls_cpu = [], []
            for _ in range(self.shape.passes):
                for layer in range(layers):
                    ca = cpu()
                    a = clock()
                    cache.attend(layer, q, k, v)
                    b = clock()
                    calls_cpu.append(cpu() - ca)
                    calls.append(b - a)
            t2 = clock()
            cache.end_chunk()
            t3 = clock()
        if not record:
            return
        out = self.samples
        self.plans.add(plan_shape(plan))
        out["begin_chunk"].append(t1 - t0)
        out["begin_chunk_cpu"].append(c1 - c0)
        out["end_chunk"].append(t3 - t2)
        out["chunk"].append(t3 - t0)
        out["attend"] += calls
        out["attend_cpu"] += calls_cpu
        out["attend_first"] += calls[:layers]
        out["attend_later"] += calls[layers:]

    def result(self) -> dict:
        # a timed chunk whose plan differs from the others means the warm-up was too short (None: plans not readable)
        steady = None if None in self.plans else len(self.plans) == 1
        return {"samples_ns": self.samples, "steady_plans": steady, "backend": getattr(self.cache, "backend", None),
                "attention": getattr(self.cache, "attention", None)}


def worker(args) -> int:
    """Serve measurements of the tree first on PYTHONPATH. Sends a hello (what was imported, the warm-ups), then
    answers each stdin line: ``start policy/mode`` (a fresh cache through its warm-up), ``chunk`` (one timed
    chunk), ``finish`` (the samples), until EOF. Messages go to stdout behind ``PROTOCOL``; anything else printed
    goes to stderr."""
    channel, sys.stdout = sys.stdout, sys.stderr

    def send(message: dict) -> None:
        channel.write(PROTOCOL + json.dumps(message) + "\n")
        channel.flush()

    try:
        import relaxkv_kernels as rk  # noqa: PLC0415 (the tree on PYTHONPATH, imported only here)
    except Exception as exc:  # a tree that does not import (e.g. mid-edit): reported, not measured
        send({"import_error": f"{type(exc).__name__}: {exc}"})
        return 0
    shape = common.shape_from_args(args.shape, args.layers, args.passes, args.dtype)
    hello = {"rk_file": str(Path(rk.__file__).resolve()), "rk_version": getattr(rk, "__version__", None),
             "warmup": {}, "warmup_source": {}}
    for name in args.policies:
        warmup, source = args.warmup.get(name), "--warmup"
        if warmup is None:
            warmup, source = steady_chunk(make_policy(rk, name), shape.height, shape.width), "planner"
        if warmup is None:
            warmup, source = FALLBACK_WARMUP[name], "fallback"
        hello["warmup"][name], hello["warmup_source"][name] = warmup, source
    send(hello)
    session = None
    for line in sys.stdin:
        command, _, key = line.strip().partition(" ")
        try:
            if command == "start":
                policy, mode = key.split("/")
                session = Session(rk, shape, policy, mode, hello["warmup"][policy])
                send({})
            elif command == "chunk":
                session.chunk()
                send({})
            else:  # finish
                send(session.result())
                session = None
        except Exception as exc:  # an older tree without this mode, or a failure on meta tensors: reported
            session = None
            send({"error": f"{type(exc).__name__}: {exc}"})
    return 0


# ----------------------------------------------------------------------------------------------------
# driver: trees, interleaved rounds, statistics, tables


def git(*cmd: str, cwd: Path) -> str:
    return subprocess.run(["git", *cmd], cwd=cwd, capture_output=True, text=True, check=True,
                          timeout=60).stdout.rstrip()


@contextlib.contextmanager
def baseline_tree(rev: str):
    """A temporary detached ``git worktree`` of ``rev``: (path, full commit); removed on exit."""
    commit = git("rev-parse", "--verify", f"{rev}^{{commit}}", cwd=common.REPO_DIR)
    tmp = Path(tempfile.mkdtemp(prefix="relaxkv_host_"))
    path = tmp / "tree"
    git("worktree", "add", "--detach", str(path), commit, cwd=common.REPO_DIR)
    try:
        yield path, commit
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(path)], cwd=common.REPO_DIR, capture_output=True,
                       timeout=60, check=False)
        shutil.rmtree(tmp, ignore_errors=True)


def dirty_files(tree: Path) -> list[str]:
    """Tracked files with uncommitted changes in ``tree`` (what "+dirty" in its commit stands for)."""
    try:
        return git("status", "--porcelain", "--untracked-files=no", cwd=tree).splitlines()
    except (OSError, subprocess.SubprocessError):
        return []


@contextlib.contextmanager
def harness_dir():
    """A temporary folder holding only a link to this tree's ``benchmarks``: first on every worker's PYTHONPATH, so
    the worker's ``benchmarks.common`` is this tree's, whichever tree's ``relaxkv_kernels`` it measures."""
    with tempfile.TemporaryDirectory(prefix="relaxkv_harness_") as tmp:
        (Path(tmp) / "benchmarks").symlink_to(common.BENCH_DIR, target_is_directory=True)
        yield tmp


class Worker:
    """The subprocess measuring one tree (its PYTHONPATH: this tree's ``benchmarks``, then the tree), one
    policy/mode per request."""

    def __init__(self, tree: dict, args, harness: str):
        self.tree = tree
        path = (harness, tree["path"], os.environ.get("PYTHONPATH"))
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in path if p))
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "--shape", args.shape,
               "--layers", str(args.layers), "--passes", str(args.passes), "--dtype", args.dtype,
               "--chunks", str(args.chunks), "--policies", *args.policies,
               "--warmup", *(f"{k}={v}" for k, v in args.warmup.items())]
        self.proc = subprocess.Popen(cmd, cwd=tree["path"], env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True)
        self.hello = self._receive()
        pkg = Path(tree["path"]).resolve() / "relaxkv_kernels"
        if "import_error" not in self.hello and Path(self.hello["rk_file"]).parent != pkg:
            self.close()
            raise RuntimeError(f"bench_host: tree {tree['name']}: imported relaxkv_kernels from "
                               f"{self.hello['rk_file']}, expected {pkg / '__init__.py'}")

    def _receive(self) -> dict:
        for line in self.proc.stdout:
            if line.startswith(PROTOCOL):
                return json.loads(line[len(PROTOCOL):])
        raise RuntimeError(f"bench_host: the worker of tree {self.tree['name']} exited (status {self.proc.wait()})")

    def ask(self, command: str) -> dict:
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return self._receive()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def stats(samples_ns: list[int]) -> dict:
    """Median, p10 and p90 (us) and the count of a list of ns samples."""
    us = [s / 1e3 for s in samples_ns]
    if len(us) < 2:
        p10 = p90 = us[0] if us else None
    else:
        deciles = statistics.quantiles(us, n=10, method="inclusive")
        p10, p90 = deciles[0], deciles[-1]
    return {"median_us": statistics.median(us) if us else None, "p10_us": p10, "p90_us": p90, "n": len(us)}


def summarise(tree: dict, runs: dict[str, list[dict]]) -> list[dict]:
    """One row per policy/mode of ``tree``: statistics of every round's samples pooled, and per-round medians."""
    if "import_error" in tree:
        return [{"tree": tree["name"], "commit": tree["commit"], "policy": "*", "mode": "*", "warmup_chunks": None,
                 "error": f"import relaxkv_kernels: {tree['import_error']}"}]
    rows = []
    for key, per_round in runs.items():
        policy, mode = key.split("/")
        row = {"tree": tree["name"], "commit": tree["commit"], "policy": policy, "mode": mode,
               "warmup_chunks": tree["warmup"][policy]}
        errors = [r["error"] for r in per_round if "error" in r]
        if errors:
            rows.append(dict(row, error=errors[0]))
            continue
        steady = [r["steady_plans"] for r in per_round]
        row.update(steady_chunks=sum(len(r["samples_ns"]["chunk"]) for r in per_round),
                   steady_plans=None if None in steady else all(steady), backend=per_round[0]["backend"],
                   attention=per_round[0]["attention"])
        for metric in METRICS:
            s = stats([x for r in per_round for x in r["samples_ns"][metric]])
            row.update({f"{metric}_{k}": v for k, v in s.items()})
        row["rounds"] = [{f"{m}_median_us": statistics.median(r["samples_ns"][m]) / 1e3 for m in COMPARED}
                         for r in per_round]
        rows.append(row)
    return rows


def compare(this: list[dict], base: list[dict]) -> list[dict]:
    """This tree against the baseline per policy/mode: medians and ratios (this / baseline)."""
    out = []
    base_by = {(r["policy"], r["mode"]): r for r in base}
    for r in this:
        b = base_by.get((r["policy"], r["mode"])) or base_by.get(("*", "*"))
        entry = {"policy": r["policy"], "mode": r["mode"]}
        if b is None or "error" in r or "error" in b:
            entry["error"] = r.get("error") or (b or {}).get("error") or "not measured for the baseline"
            out.append(entry)
            continue
        for metric in COMPARED:
            x, y = r[f"{metric}_median_us"], b[f"{metric}_median_us"]
            entry.update({f"{metric}_us": x, f"{metric}_us_baseline": y, f"{metric}_ratio": x / y if y else None})
        entry["attend_ratio_rounds"] = [a["attend_median_us"] / c["attend_median_us"]
                                        for a, c in zip(r["rounds"], b["rounds"])]
        out.append(entry)
    return out


def measured(rows: list[dict], prefix=lambda r: ""):
    """(policy/mode, row) of the rows that ran; prints a line for each that failed (``prefix``: its first columns)."""
    for r in rows:
        name = f"{r['policy']}/{r['mode']}"
        if "error" in r:
            print(f"{name:<16}{prefix(r)} failed: {r['error']}")
        else:
            yield name, r


def print_tree(tree: dict, rows: list[dict]) -> None:
    f = common.fmt
    print(f"\n{tree['name']} ({tree['commit']}): us per call, wall median [p10-p90] over the steady chunks; "
          "cpu: median of the thread's CPU time")
    print(f"{'mode':<16} {'warm':>4} {'attend':>20} {'cpu':>5} {'1st pass':>8} {'later':>6} {'begin_chunk':>20} "
          f"{'cpu':>5} {'end_chunk':>9} {'chunk ms':>8}")
    for name, r in measured(rows, lambda r: f" {r['warmup_chunks']!s:>4}"):
        att = f"{f(r['attend_median_us'])} [{f(r['attend_p10_us'])}-{f(r['attend_p90_us'])}]"
        beg = f"{f(r['begin_chunk_median_us'])} [{f(r['begin_chunk_p10_us'])}-{f(r['begin_chunk_p90_us'])}]"
        print(f"{name:<16} {r['warmup_chunks']:>4} {att:>20} {f(r['attend_cpu_median_us']):>5} "
              f"{f(r['attend_first_median_us']):>8} {f(r['attend_later_median_us']):>6} {beg:>20} "
              f"{f(r['begin_chunk_cpu_median_us']):>5} {f(r['end_chunk_median_us']):>9} "
              f"{f(r['chunk_median_us'] / 1e3):>8}" + ("  (plans not steady)" if r["steady_plans"] is False else ""))


def print_comparison(rev: str, rows: list[dict]) -> None:
    f = common.fmt
    print(f"\nthis tree vs {rev}: median us per call, wall (cpu: the thread's CPU time); ratio = this / {rev}, "
          f"> 1 is slower; {LABEL}")
    print(f"{'mode':<16} {'attend':>6} {rev[:8]:>8} {'ratio':>5} {'per round':>14} {'cpu':>5} "
          f"{'begin':>6} {rev[:8]:>8} {'ratio':>5} {'cpu':>5} {'chunk':>5}")
    for name, r in measured(rows):
        rounds = ",".join(f"{x:.2f}" for x in r["attend_ratio_rounds"])
        print(f"{name:<16} {f(r['attend_us']):>6} {f(r['attend_us_baseline']):>8} {r['attend_ratio']:>5.2f} "
              f"{rounds:>14} {r['attend_cpu_ratio']:>5.2f} {f(r['begin_chunk_us']):>6} "
              f"{f(r['begin_chunk_us_baseline']):>8} {r['begin_chunk_ratio']:>5.2f} {r['begin_chunk_cpu_ratio']:>5.2f} "
              f"{r['chunk_ratio']:>5.2f}")


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def parse_warmup(items: list[str]) -> dict[str, int]:
    out = {}
    for item in items:
        name, _, n = item.partition("=")
        if name not in POLICIES or not n.isdigit():
            raise SystemExit(f"bench_host: --warmup: expected POLICY=N with POLICY in {POLICIES}, got {item!r}")
        out[name] = int(n)
    return out


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--baseline", metavar="REV", help="also measure git revision REV (temporary worktree), interleaved")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    p.add_argument("--chunks", type=int, default=30, help="steady chunks timed per policy, mode and round (default 30)")
    p.add_argument("--warmup", nargs="*", default=[], metavar="POLICY=N",
                   help="warm-up chunks of a policy (default: its first steady-shape chunk: dense 6, relax 4, pack 67)")
    p.add_argument("--policies", nargs="+", choices=POLICIES, default=list(POLICIES))
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    p.add_argument("--shape", choices=list(common.SHAPES), default="wan")
    p.add_argument("--layers", type=int, help="override the shape's layers")
    p.add_argument("--passes", type=int, help="override the shape's passes per chunk")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--out", help="JSON path (default benchmarks/results/host_<shape>_cpu.json; CSV beside it)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)  # internal: serve measurements
    args = p.parse_args(argv)
    args.warmup = parse_warmup(args.warmup)
    if args.chunks < 1 or args.rounds < 1:
        p.error("--chunks and --rounds must be at least 1")
    return args


def main(argv=None) -> dict | int:
    args = parse_args(argv)
    if args.worker:
        return worker(args)
    shape = common.shape_from_args(args.shape, args.layers, args.passes, args.dtype)
    args.layers, args.passes = shape.layers, shape.passes  # what the workers are told
    env = common.env_info(torch.device("cpu"))
    env.update(device="meta/host", device_type="meta", cpu_model=cpu_model(), cpu_timing=True)
    trees = [{"name": "this", "path": str(common.REPO_DIR), "commit": common.git_commit(),
              "dirty_files": dirty_files(common.REPO_DIR)}]
    keys = [f"{p}/{m}" for p in args.policies for m in args.modes]
    runs: dict[str, dict[str, list[dict]]] = {}
    with contextlib.ExitStack() as stack:
        harness = stack.enter_context(harness_dir())
        if args.baseline:
            path, commit = stack.enter_context(baseline_tree(args.baseline))
            trees.append({"name": args.baseline, "path": str(path), "commit": commit, "dirty_files": []})
        workers = []
        for tree in trees:
            print(f"{tree['name']} ({tree['commit'][:12]}): starting its worker", file=sys.stderr, flush=True)
            w = Worker(tree, args, harness)
            stack.callback(w.close)
            tree.update(w.hello)
            runs[tree["name"]] = {key: [] for key in keys}
            if "import_error" in w.hello:
                print(f"  import relaxkv_kernels failed: {w.hello['import_error']}", file=sys.stderr, flush=True)
            else:
                workers.append(w)
        for i in range(args.rounds):
            for key in keys:
                t0 = time.perf_counter()
                started = {w.tree["name"]: w.ask(f"start {key}") for w in workers}  # fresh caches, warmed up
                live = [w for w in workers if "error" not in started[w.tree["name"]]]
                for j in range(args.chunks):  # the trees take turns chunk by chunk: this, REV, REV, this, ...
                    for w in live[:: 1 if j % 2 == 0 else -1]:  # (either goes first as often as the other)
                        reply = w.ask("chunk")
                        if "error" in reply:
                            started[w.tree["name"]] = reply
                    live = [w for w in live if "error" not in started[w.tree["name"]]]
                for w in workers:
                    name = w.tree["name"]
                    res = w.ask("finish") if w in live else started[name]
                    runs[name][key].append(res)
                    state = res.get("error") or f"{statistics.median(res['samples_ns']['attend']) / 1e3:.0f} us/attend"
                    print(f"round {i + 1}/{args.rounds} {key} {name}: {state}", file=sys.stderr, flush=True)
                print(f"  {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
    rows = {t["name"]: summarise(t, runs[t["name"]]) for t in trees}
    for t in trees[1:]:
        t["path"] = f"(temporary worktree of {t['commit']})"
    payload = {"benchmark": "host", "label": LABEL, "env": env, "shape": asdict(shape),
               "settings": {"device": "meta", "backend": "auto", "dtype": args.dtype, "rounds": args.rounds,
                            "chunks": args.chunks, "policies": args.policies, "modes": args.modes,
                            "timer": "time.perf_counter_ns (wall) and time.thread_time_ns (cpu) per call; statistics "
                                     "over the steady chunks of every round"},
               "trees": trees}
    if args.baseline:
        payload["baseline"] = args.baseline
        payload["comparison"] = compare(rows["this"], rows[args.baseline])
    all_rows = [r for t in trees for r in rows[t["name"]]]
    out = Path(args.out) if args.out else common.default_out("host", args.shape, torch.device("cpu"))
    json_path, _ = common.write_results(out, payload, all_rows)
    print(f"\n{LABEL}; {env['cpu_model']}, python {env['python']}, torch {env['torch']}; wrote {json_path}")
    for t in trees:
        print_tree(t, rows[t["name"]])
    if args.baseline:
        print_comparison(args.baseline, payload["comparison"])
    return dict(payload, rows=all_rows)


if __name__ == "__main__":
    result = main()
    sys.exit(result if isinstance(result, int) else 0)
