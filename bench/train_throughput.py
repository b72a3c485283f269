"""Training throughput of the demo recipe, and of the authors' training loop on the same files.

Runs, back to back and alternating (``--repeats`` rounds of OURS then AUTHORS):

- OURS: ``gpo-train experiment=demo`` (region features + BiGRU + GPO, batch 128, d = 128) with its
  defaults (CSV logger, progress bar, ``last.ckpt`` schedule, gradient clipping), validation off,
  for ``--steps`` training steps, timed by a callback at the end of every step;
- AUTHORS (with ``--authors PATH``: a checkout of the BiGRU branch of VSE∞,
  ``github.com/woodfrog/vse_infty``, ``git checkout bigru``): their ``train.train`` loop (data
  loader, ``VSEModel.train_emb``, logging) on the same ``data/demo`` files, the same vocabulary
  (written in SCAN's JSON layout) and the same settings (batch 128, joint dim 128, word dim 300,
  margin 0.2, lr 5e-4, clipping 2, all negatives in epoch 0, region dropping and word
  perturbation on, 0 loader workers), timed when each batch is requested.

Both run single-threaded (``torch.set_num_threads(1)``, ``OMP_NUM_THREADS=1``) in their own
process. Steps/s count the steps after ``--warmup`` (time between the end of step ``warmup`` and
the end of the last step: loading and the step itself); the epoch time is the demo's 234 steps at
that rate. The authors' code is never copied into this repository: it is copied at run time into
a temporary folder and patched there for a CPU (CUDA calls guarded, optional imports of the
raw-image path — cv2, imageio — dropped, ``tensorboard_logger`` replaced by a no-op module,
nltk's tokenizer told not to need the punkt download, ``preserve_line=True``, as gpo_lit does).

With ``--to-end SEEDS`` (e.g. ``0,1,2``) both train the whole recipe instead, once per seed: ours
``gpo-train experiment=demo seed=S`` (6 epochs, validation each epoch, the best checkpoint by dev
rsum tested); theirs ``train.main`` with ``--num_epochs 6 --lr_update 3`` (validation and
``model_best.pth`` by dev rsum), then that checkpoint encoded and ranked on the same test files by
their own evaluation functions (``encode_data``, ``i2t``, ``t2i``: the steps of their
``evalrank``, whose vocabulary path is fixed to ``/tmp/data/vocab``). It prints each seed's test
rsum and the mean and sample standard deviation over seeds of each side. Their dev split is cut to
5,000 captions (F30K's dev size); the demo's dev has 2,500, so the driver keeps its own length.

    PYTHONPATH=src python bench/train_throughput.py --authors /tmp/vse_infty [--steps 60]
    PYTHONPATH=src python bench/train_throughput.py --authors /tmp/vse_infty --to-end 0,1,2
    PYTHONPATH=src python bench/train_throughput.py --smoke    # tiny, ours only (tested)
    PYTHONPATH=src python bench/train_throughput.py --smoke --to-end 0   # (tested)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from gpo_lit.callbacks.outputs import METRICS_FILE
from gpo_lit.threads import load_average

ROOT = Path(__file__).resolve().parents[1]
DEMO_STEPS_PER_EPOCH = 234  # 6,000 scenes x 5 captions // 128
TEST_PROTOCOL = "full"  # conf/evaluation/demo.yaml: all 5,000 test scenes ranked at once
THREAD_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}

# (file, text in their code, replacement, how many times it occurs): applied to a temporary copy.
AUTHOR_PATCHES: list[tuple[str, str, str, int]] = [
    (
        "lib/vse.py",
        "lengths = torch.Tensor(lengths).cuda()",
        "lengths = torch.Tensor(lengths).cuda() if torch.cuda.is_available() "
        "else torch.Tensor(lengths)",
        1,
    ),
    ("lib/datasets/image_caption.py", "from imageio import imread\n", "imread = None\n", 1),
    ("lib/datasets/image_caption.py", "import cv2\n", "cv2 = None\n", 1),
    (
        "lib/datasets/image_caption.py",
        "nltk.tokenize.word_tokenize(caption.lower())",
        "nltk.tokenize.word_tokenize(caption.lower(), preserve_line=True)",
        2,
    ),
    # A batch's ids are a tuple (their collate's zip), which numpy reads as one index per axis;
    # on a GPU, the torch 1.x of their time pinned them into a list (--to-end's evaluation).
    ("lib/evaluation.py", "img_embs[ids] = ", "img_embs[list(ids)] = ", 1),
    ("lib/evaluation.py", "cap_embs[ids, :] = ", "cap_embs[list(ids), :] = ", 1),
]
STUB_TB = "def configure(*a, **k):\n    pass\n\n\ndef log_value(*a, **k):\n    pass\n"

# Written into the temporary copy of their code and run there: builds their model and loader with
# their own functions and runs their training loop for a fixed number of steps.
AUTHOR_DRIVER = r'''
import json, sys, time
import torch
torch.set_num_threads(1)
import arguments, train
from lib.vocab import deserialize_vocab
from lib.datasets import image_caption
from lib.vse import VSEModel

steps, warmup, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
opt = arguments.get_argument_parser().parse_args(sys.argv[4:])
vocab = deserialize_vocab(opt.vocab_path + "/f30k_precomp_vocab.json")
vocab.add_word("<mask>")
opt.vocab_size = len(vocab)
torch.manual_seed(0)
loader = image_caption.get_train_loader(
    opt.data_path, opt.data_name, vocab, opt.batch_size, opt.workers, opt, True)


class Timed:
    """Their loader, cut after `steps` batches; the time each batch is asked for is kept."""

    def __init__(self, loader):
        self.loader, self.dataset, self.batch_size = loader, loader.dataset, loader.batch_size
        self.times, self.cpu = [], []

    def __len__(self):
        return steps

    def __iter__(self):
        for i, batch in enumerate(self.loader):
            self.times.append(time.perf_counter())
            self.cpu.append(time.process_time())
            if i == steps:
                return
            yield batch


model = VSEModel(opt)
timed = Timed(loader)
train.train(opt, timed, model, 0, None)  # epoch 0: all negatives (vse_mean_warmup_epochs=1)
t, c = timed.times, timed.cpu
n = len(t) - 1 - warmup
json.dump({"wall": n / (t[-1] - t[warmup]), "cpu": n / (c[-1] - c[warmup])}, open(out, "w"))
'''


# The whole recipe with their own functions (``--to-end``): train.main, then the test split ranked
# as their evalrank ranks it (full test set, no 5-fold), the rsum written as JSON.
AUTHOR_FULL_DRIVER = r"""
import json, os, random, sys
import numpy as np
import torch
torch.set_num_threads(1)
seed, out = int(sys.argv[1]), sys.argv[2]
sys.argv = [sys.argv[0], *sys.argv[3:]]
random.seed(seed)
np.random.seed(seed)
torch.manual_seed(seed)
import arguments, train
from lib import evaluation
from lib.datasets import image_caption
from lib.vocab import deserialize_vocab
from lib.vse import VSEModel

their_init = image_caption.PrecompRegionDataset.__init__


def own_length(self, *args, **kwargs):  # their dev split is cut to F30K's 5,000 captions
    their_init(self, *args, **kwargs)
    self.length = len(self.captions)


image_caption.PrecompRegionDataset.__init__ = own_length
train.main()
opt = arguments.get_argument_parser().parse_args()
vocab = deserialize_vocab(opt.vocab_path + "/f30k_precomp_vocab.json")
vocab.add_word("<mask>")
opt.vocab_size = len(vocab)
stored = torch.load(os.path.join(opt.model_name, "model_best.pth"), map_location="cpu",
                    weights_only=False)  # their own file, written a moment ago by train.main
model = VSEModel(stored["opt"])
model.load_state_dict(stored["model"])
model.val_start()
loader = image_caption.get_test_loader("test", opt.data_name, vocab, opt.batch_size, 0, opt)
with torch.no_grad():
    img_embs, cap_embs = evaluation.encode_data(model, loader)
img_embs = np.array([img_embs[i] for i in range(0, len(img_embs), 5)])
sims = evaluation.compute_sim(img_embs, cap_embs)
r = evaluation.i2t(img_embs.shape[0], sims)
ri = evaluation.t2i(img_embs.shape[0], sims)
json.dump({"rsum": r[0] + r[1] + r[2] + ri[0] + ri[1] + ri[2]}, open(out, "w"))
"""


def show(who: str, rates: dict[str, float]) -> None:
    print(
        f"{who:8s}{rates['wall']:.3f} steps/s, {rates['cpu']:.3f} steps per CPU second "
        f"({load_average()})",
        flush=True,
    )


def fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def check_authors(src: Path) -> None:
    """One line and exit status 2 unless ``src`` holds the files of their BiGRU branch that the
    run uses, each with the text the patches replace."""
    for need in ("train.py", "arguments.py", "lib/vse.py", "lib/vocab.py"):
        if not (src / need).is_file():
            fail(
                f"--authors {src}: expected a checkout of the BiGRU branch of "
                f"woodfrog/vse_infty, found no {need}"
            )
    for rel, old, _, count in AUTHOR_PATCHES:
        found = (src / rel).read_text().count(old) if (src / rel).is_file() else 0
        if found != count:
            fail(f"--authors {src}: expected {count} x {old!r} in {rel} (bigru), found {found}")


def prepare_authors(src: Path, tmp: Path, demo: Path) -> Path:
    """Copy their code into ``tmp/code``, patch it, and lay out the demo files as their loader
    expects (``data_path/precomp/{split}_{ims.npy,caps.txt}``, ``vocab/f30k_precomp_vocab.json``)."""
    check_authors(src)
    code = tmp / "code"
    shutil.copytree(src, code, ignore=shutil.ignore_patterns(".git", "data", "docs"))
    for rel, old, new, _count in AUTHOR_PATCHES:
        path = code / rel
        path.write_text(path.read_text().replace(old, new))
    (code / "tensorboard_logger.py").write_text(STUB_TB)
    (code / "driver.py").write_text(AUTHOR_DRIVER)
    (code / "full_driver.py").write_text(AUTHOR_FULL_DRIVER)
    data = tmp / "data"
    (data / "precomp").mkdir(parents=True)
    for split in ("train", "dev", "test"):
        for suffix in ("ims.npy", "caps.txt"):
            (data / "precomp" / f"{split}_{suffix}").symlink_to(demo / f"{split}_{suffix}")
    return code


def build_vocab_json(demo: Path, dest: Path) -> None:
    """The vocabulary ``experiment=demo`` builds (train+dev captions, min count 4), in SCAN's
    JSON layout for their loader."""
    from gpo_lit.data.formats.base import read_lines
    from gpo_lit.data.vocab import Vocabulary

    caps = read_lines(demo / "train_caps.txt", "caption") + read_lines(
        demo / "dev_caps.txt", "caption"
    )
    dest.parent.mkdir(parents=True, exist_ok=True)
    Vocabulary.build(caps, min_count=4).save(dest)


def author_args(tmp: Path) -> list[str]:
    """Their command-line options for the demo recipe's settings."""
    return [
        *("--data_path", str(tmp / "data"), "--data_name", "f30k_precomp"),
        *("--vocab_path", str(tmp / "vocab"), "--batch_size", "128", "--workers", "0"),
        *("--embed_size", "128", "--img_dim", "128", "--word_dim", "300", "--margin", "0.2"),
        *("--learning_rate", "5e-4", "--grad_clip", "2", "--vse_mean_warmup_epochs", "1"),
        *("--log_step", "10", "--logger_name", str(tmp / "runs/log")),
        *("--model_name", str(tmp / "runs/ckpt")),
    ]


def run_author_script(code: Path, script: str, out: Path, *args: str) -> dict[str, float]:
    res = subprocess.run(
        [sys.executable, script, *args],
        cwd=code,
        env={**os.environ, **THREAD_ENV, "PYTHONPATH": str(code)},
        capture_output=True,
        text=True,
    )
    if res.returncode != 0:
        fail(f"the authors' loop failed:\n{res.stderr[-3000:]}")
    return json.loads(out.read_text())


def run_authors(code: Path, tmp: Path, steps: int, warmup: int) -> dict[str, float]:
    out = tmp / "authors.json"
    return run_author_script(
        code, "driver.py", out, str(steps), str(warmup), str(out), *author_args(tmp)
    )


def run_authors_to_end(code: Path, tmp: Path, seed: int) -> float:
    """Their whole recipe for one seed; the test rsum of their best checkpoint by dev rsum."""
    out = tmp / f"authors_seed{seed}.json"
    shutil.rmtree(tmp / "runs", ignore_errors=True)
    args = [*author_args(tmp), "--num_epochs", "6", "--lr_update", "3"]
    return run_author_script(code, "full_driver.py", out, str(seed), str(out), *args)["rsum"]


def run_gpo_lit(tmp: Path, data_dir: Path, overrides: list[str]) -> Path:
    """``gpo-train experiment=demo`` with ``overrides`` in its own process; its run folder."""
    run_dir = Path(tempfile.mkdtemp(prefix="ours_", dir=tmp))
    cmd = [sys.executable, "-m", "gpo_lit.train", "experiment=demo", f"hydra.run.dir={run_dir}"]
    path = os.pathsep.join(
        [str(ROOT / "src"), str(ROOT / "bench"), os.environ.get("PYTHONPATH", "")]
    )
    env = {**os.environ, **THREAD_ENV, "PYTHONPATH": path, "GPO_LIT_DATA": str(data_dir)}
    env |= {"HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}
    res = subprocess.run([*cmd, *overrides], cwd=tmp, env=env, capture_output=True, text=True)
    if res.returncode != 0:
        fail(f"gpo_lit's training failed:\n{res.stderr[-3000:]}")
    return run_dir


def run_ours(
    tmp: Path, data_dir: Path, steps: int, warmup: int, extra: list[str]
) -> dict[str, float]:
    out = tmp / "ours.json"
    overrides = [
        *("trainer.max_epochs=1", f"trainer.limit_train_batches={steps + 1}"),
        *("+trainer.limit_val_batches=0", "test_after_fit=false"),
        "+callbacks.step_timer._target_=train_throughput.StepTimer",
        f"+callbacks.step_timer.out={out}",
        f"+callbacks.step_timer.warmup={warmup}",
    ]
    run_gpo_lit(tmp, data_dir, [*overrides, *extra])
    return json.loads(out.read_text())


def run_ours_to_end(tmp: Path, data_dir: Path, seed: int, extra: list[str]) -> float:
    """The whole demo recipe for one seed; the test rsum of its best checkpoint by dev rsum."""
    run_dir = run_gpo_lit(tmp, data_dir, [f"seed={seed}", *extra])
    return json.loads((run_dir / METRICS_FILE).read_text())[TEST_PROTOCOL]["rsum"]


try:  # the timing callback, importable in the training subprocess (bench/ is on its path)
    import pytorch_lightning as pl

    class StepTimer(pl.Callback):
        """Records wall and CPU time at the end of every step; writes the rates after ``warmup``."""

        def __init__(self, out: str, warmup: int) -> None:
            self.out, self.warmup = out, warmup
            self.times, self.cpu = [time.perf_counter()], [time.process_time()]

        def on_train_batch_end(self, *_args) -> None:
            self.times.append(time.perf_counter())
            self.cpu.append(time.process_time())

        def on_train_end(self, *_args) -> None:
            t, c, w = self.times, self.cpu, self.warmup
            n = len(t) - 1 - w
            rates = {"wall": n / (t[-1] - t[w]), "cpu": n / (c[-1] - c[w])}
            Path(self.out).write_text(json.dumps(rates))

except ImportError:  # pragma: no cover
    pass


def demo_settings() -> dict[str, int]:
    """The ``demo:`` block of ``conf/data/demo.yaml``: the files ``experiment=demo`` expects."""
    from omegaconf import OmegaConf

    return dict(OmegaConf.to_container(OmegaConf.load(ROOT / "conf/data/demo.yaml").demo))


def seeds_arg(text: str) -> list[int]:
    try:
        seeds = [int(t) for t in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seeds such as 0,1,2, found {text!r}") from None
    return seeds


def spread(values: list[float]) -> str:
    """Mean ± sample standard deviation (the mean alone for one value)."""
    if len(values) < 2:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def to_end(
    seeds: list[int], tmp: Path, data_dir: Path, code: Path | None, extra: list[str]
) -> None:
    """Each side trains the whole recipe once per seed, alternating; test rsum per seed."""
    rsums: dict[str, list[float]] = {"ours": [], "authors": []}
    for seed in seeds:
        rsums["ours"].append(run_ours_to_end(tmp, data_dir, seed, extra))
        print(f"OURS    seed {seed}: test rsum {rsums['ours'][-1]:.2f} ({load_average()})")
        if code is not None:
            rsums["authors"].append(run_authors_to_end(code, tmp, seed))
            print(f"AUTHORS seed {seed}: test rsum {rsums['authors'][-1]:.2f} ({load_average()})")
    print()
    for who, values in rsums.items():
        if values:
            print(f"{who}: test rsum {spread(values)} over seeds {seeds}")
    if rsums["authors"]:
        diff = statistics.mean(rsums["ours"]) - statistics.mean(rsums["authors"])
        print(f"ours - authors, mean test rsum: {diff:+.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--authors", type=Path, default=None, help="checkout of vse_infty (bigru)")
    ap.add_argument("--steps", type=int, default=60, help="timed steps per run, after warm-up")
    ap.add_argument("--warmup", type=int, default=5, help="steps not timed at the start")
    ap.add_argument("--repeats", type=int, default=2, help="alternating rounds; medians shown")
    ap.add_argument(
        "--data", type=Path, default=None, help="data dir holding demo/ (made if absent)"
    )
    ap.add_argument(
        "--to-end",
        type=seeds_arg,
        default=None,
        metavar="SEEDS",
        help="train the whole recipe once per seed (e.g. 0,1,2); test rsum of each side",
    )
    ap.add_argument("--smoke", action="store_true", help="a few steps of ours, seconds (tested)")
    ap.add_argument(
        "overrides", nargs="*", help="extra overrides of our run (e.g. model.compile=true)"
    )
    args = ap.parse_args()
    if args.smoke:
        args.steps, args.warmup, args.repeats = 3, 1, 1
    if args.authors is not None:
        check_authors(args.authors.resolve())
    total = args.steps + args.warmup
    tmp = Path(tempfile.mkdtemp(prefix="train_throughput_"))
    try:
        from gpo_lit.data.demo.regions import generate_demo

        sizes = {"n_train": 600, "n_dev": 50, "n_test": 50} if args.smoke else {}
        data_dir = (tmp / "data_smoke" if args.smoke else args.data or ROOT / "data").resolve()
        # what experiment=demo reads: conf/data/demo.yaml's settings (they differ from the
        # generator's defaults), a smaller split with --smoke
        demo = generate_demo(data_dir / "demo", **{**demo_settings(), **sizes})
        args.overrides += [f"data.demo.{k}={v}" for k, v in sizes.items()]
        code = None
        if args.authors is not None:
            code = prepare_authors(args.authors.resolve(), tmp, demo)
            build_vocab_json(demo, tmp / "vocab" / "f30k_precomp_vocab.json")
        print(f"before: {load_average()}")
        if args.to_end is not None:
            to_end(args.to_end, tmp, data_dir, code, args.overrides)
            print(f"after: {load_average()}")
            return
        runs: dict[str, list[dict[str, float]]] = {"ours": [], "authors": []}
        for _ in range(args.repeats):
            runs["ours"].append(run_ours(tmp, data_dir, total, args.warmup, args.overrides))
            show("OURS", runs["ours"][-1])
            if code is not None:
                runs["authors"].append(run_authors(code, tmp, total, args.warmup))
                show("AUTHORS", runs["authors"][-1])
        print()
        med = {who: {k: statistics.median(r[k] for r in rs) for k in ("wall", "cpu")}
               for who, rs in runs.items() if rs}  # fmt: skip
        for who, m in med.items():
            print(
                f"{who}: {m['wall']:.3f} steps/s, {m['cpu']:.3f} steps per CPU second; demo epoch "
                f"({DEMO_STEPS_PER_EPOCH} steps) {DEMO_STEPS_PER_EPOCH / m['wall']:.0f} s wall, "
                f"{DEMO_STEPS_PER_EPOCH / m['cpu']:.0f} s CPU"
            )
        if "authors" in med:
            for k, what in (("wall", "steps/s"), ("cpu", "steps per CPU second")):
                rounds = ", ".join(
                    f"{o[k] / a[k]:.2f}x"
                    for o, a in zip(runs["ours"], runs["authors"], strict=True)
                )
                ratio = med["ours"][k] / med["authors"][k]
                print(f"ours / authors, {what}: {ratio:.2f}x (target >= 1.5x; rounds: {rounds})")
        print(f"after: {load_average()}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
