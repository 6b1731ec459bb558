"""Off-policy KD vs on-policy KD (GKD, lambda 0.5) vs KD followed by a DPO stage, at equal wall-clock.

Protocol (fixed before the first real run; every figure is printed in the JSON's "protocol"):

- Teacher: the embedded SmolLM2-135M-Instruct. Student: the demo's, 20 of the teacher's 30 layers chosen by
  block influence (StudentConfig(method="depth", num_layers=20)), the same starting folder for every arm.
- Data: the teacher's greedy answers to the bundled prompts (`_common.teacher_answers`, at most
  --max-new-tokens (96) tokens, cached in --workdir); the first --train (120) conversations of the train split
  are trained on (and are the prompts of the on-policy rollouts and of `kdforge prefs`), the first --val (32)
  of the held-out validation split are only scored, never trained on.
- Common settings of every distill run: the live teacher, forward KL, temperature 1.0, alpha 0.5 (weight of
  the CE on the teacher's answer; on-policy steps use alpha 0, as the library does: no CE on the student's
  own samples), batch 4, AdamW peak lr 3e-4, warmup max(1, max_steps // 10) steps (the runs are short: on this
  CPU a step takes seconds, so a budget holds ~5-30 steps), cosine to 0.1 x lr, max_length 256, distill's seed
  = the benchmark seed (data order and the on-policy draws).
- Arms, each given the same wall-clock budget --budget-s (150 s) of training per seed:
    * off_policy: `kdforge distill`, on_policy 0 (sequence-level KD on the teacher's answers);
    * on_policy: the same with on_policy 0.5 (each step on-policy with probability 0.5, drawn from (seed,
      step)); rollout temperature 1.0, top-p 1.0, max_new_tokens = the teacher answers' cap (96);
    * kd_then_dpo: off-policy KD (the off_policy settings) for --kd-fraction (0.6) of the budget; then
      `kdforge prefs` on the first n_p train prompts (sampler = that KD student, teacher ranks by loglik,
      num_samples 4, include_reference true (the teacher's answer is a fifth candidate), prefs' own sampling
      defaults temperature 0.8, top-p 0.95, max_new_tokens 96, prefs seed = the benchmark seed; pairs
      best_worst); then `kdforge distill --objective dpo` from the KD student on those pairs (beta 0.1,
      sigmoid, no SFT term, batch 4 pairs, peak lr --dpo-lr 3e-5 (a tenth of the KD lr: not tuned),
      warmup max(1, steps // 10), cosine) for the rest of the budget. (0.6, not 0.7: timed on the tiny
      end-to-end test, before any real run, prefs took ~15 s per prompt here, so 0.3 of 150 s could not hold
      even a few prompts.) Prefs' sampling + ranking seconds and
      the DPO run's reference scoring (the KD student's log-probs of every pair, made once at its set-up) count
      against the arm's budget. n_p is chosen so that prefs + reference scoring + 2 epochs of DPO over n_p
      pairs fill the remaining (1 - kd_fraction) budget by the calibrated rates (at least 2, at most --train);
      the DPO steps are then (budget - the KD stage's actual step seconds - prefs' actual seconds - the
      calibrated reference seconds) / the calibrated DPO step time, at least 1.
- Equal wall-clock: the distill stage has no time limit, so step times are calibrated once, on the starting
  student (seed 0), before any real run: off-policy steps (--calib-steps 4 steps), on-policy steps (a run at
  on_policy 1.0, so every step samples; --calib-on-steps 3), DPO steps (--calib-steps on pairs from a
  calibration prefs run of --calib-prompts 4 prompts, which also gives prefs' seconds per prompt and the
  reference scoring's seconds per pair); a step time is the median of a run's per-step seconds but the first.
  off_policy gets max_steps = floor(budget / off step time); on_policy the largest max_steps whose calibrated
  time (on steps x on time + off steps x off time, with the exact on/off draws of its seed) fits the budget.
  The seconds actually spent (sum of the log's per-step seconds, set-up and model loading excluded, for every
  arm; plus prefs and reference seconds for kd_then_dpo) are reported as "budget_used_s". Machine load moves
  these: the CPU use of other processes is sampled before every timed run ("others_cpu_cores").
- Threads: torch runs with --threads (1) intra-op threads. This 2-core machine is shared: with another busy
  process beside it, 2 OpenMP threads made a decode-sized matmul (16x576 @ 576x1536) 4.5x slower than 1 thread
  (6.3 vs 1.4 ms, measured before any arm ran), which would charge the generation-heavy arms (on-policy
  rollouts, prefs sampling) for the machine's load rather than for their method.
- Scores, on the --val held-out conversations, for every final student and the starting student (reference,
  once); the teacher with every measure too with --teacher-ref, else only its NLL of its own (greedy, cached)
  answers ("teacher_nll_own_answers"):
    (a) teacher-forced on the teacher's answers (the teacher's logits at the answer tokens computed once;
        kdforge.models.forward.target_logits, packed, and kdforge.distill.losses.divergence): forward
        KL(teacher || student) at T=1 per answer token ("tf_kl"), top-1 agreement with the teacher's argmax
        ("tf_top1"), the student's NLL of the teacher's answer tokens ("tf_nll");
    (b) the student's own answers: greedy answers to the validation prompts (the runtime's generate,
        temperature 0, at most --max-new-tokens tokens, the end-of-turn token kept when chosen), scored by the
        teacher in its own forward pass over exactly those tokens (kdforge.scoring.agreement): the teacher's
        mean per-token NLL
        ("gen_teacher_nll", lower = answers the teacher finds likelier; what on-policy training is meant to
        improve), with diagnostics: KL(teacher || student) at those tokens ("gen_kl"), mean answer tokens
        ("gen_tokens"), share of answers that ended their turn ("gen_finished"), share of repeated 4-grams
        within an answer ("gen_rep4": short or looping answers can also lower gen_teacher_nll); and the kdforge
        task score (kdforge.eval.tasks.run_tasks, greedy, short 32 / code 128 tokens, "overall" mean) on
        --tasks (4) items of each type (short, code), evenly spaced through the bundled file, the same for all.
- Per arm per seed, the mean over seeds with min/max and std; "wins": per measure, the seeds on which each arm
  is the best of the three, and the seeds on which on_policy and kd_then_dpo beat off_policy (ties count as no
  win); "gen_rep4", "gen_tokens", "gen_finished" are reported but not ranked.

Prints one JSON line {"means", "spread", "wins", "per_seed", "reference", "calibration", "plan",
"others_cpu_cores", "protocol", "seconds"}; progress goes to stderr.
Usage: python benchmarks/on_policy.py [--budget-s 150] [--seeds 2] [--val 32] [--tasks 4] [--train 120]
       [--kd-fraction 0.6] [--dpo-lr 3e-5] [--threads 1] [--teacher-ref] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import TEACHER, teacher_answers  # noqa: E402

ARMS = ("off_policy", "on_policy", "kd_then_dpo")
# measure -> True when higher is better (ranked in "wins")
RANKED = {"tf_kl": False, "tf_top1": True, "tf_nll": False, "gen_teacher_nll": False, "gen_kl": False,
          "task": True}
REPORTED = (*RANKED, "task_short", "task_code", "gen_tokens", "gen_finished", "gen_rep4")
COMMON = {"loss": "forward_kl", "temperature": 1.0, "alpha": 0.5, "batch_size": 4, "lr": 3e-4, "max_length": 256,
          "log_every": 1}
ON_POLICY = 0.5
DPO = {"beta": 0.1, "loss_type": "sigmoid", "sft_weight": 0.0}
PREFS = {"num_samples": 4, "include_reference": True, "rank_by": "loglik", "temperature": 0.8, "top_p": 0.95,
         "pairs": "best_worst", "batch_size": 16}
DPO_EPOCHS_PLANNED = 2
PACK = 256  # scoring forwards lay conversations end to end (block-diagonal attention), as distill does


def log(msg: str) -> None:
    print(f"[on_policy] {msg}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def stdout_to_stderr():
    """kdforge's stages print progress on stdout; this script's stdout is its one JSON line."""
    with contextlib.redirect_stdout(sys.stderr):
        yield


def others_cpu(interval: float = 2.0) -> float:
    """Cores busy with processes other than this one over ``interval`` seconds (from /proc)."""
    def ticks() -> dict[int, int]:
        out = {}
        for d in os.listdir("/proc"):
            if d.isdigit() and int(d) != os.getpid():
                try:
                    f = open(f"/proc/{d}/stat").read().rsplit(")", 1)[1].split()  # noqa: SIM115
                    out[int(d)] = int(f[11]) + int(f[12])
                except (OSError, IndexError, ValueError):
                    continue
        return out
    a = ticks()
    time.sleep(interval)
    b = ticks()
    return round(sum(b[p] - a.get(p, 0) for p in b) / os.sysconf("SC_CLK_TCK") / interval, 2)


# ---------------------------------------------------------------- data, models, runs

def subset_data(gen: Path, root: Path, train: int, val: int) -> Path:
    """The first ``train`` train and ``val`` validation conversations of a generate folder, as a JSONL."""
    from kdforge.data.formats import load_training_data, select_split

    out = root / f"op-data-{gen.name}-{train}-{val}.jsonl"
    if not out.is_file():
        convs = select_split(load_training_data(gen), "train")[:train] + \
            select_split(load_training_data(gen), "validation")[:val]
        rows = [{"id": c.id, "messages": c.messages, "category": c.category, "split": c.split or "train"}
                for c in convs]
        tmp = out.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
        tmp.rename(out)
    return out


def demo_student(root: Path) -> Path:
    from kdforge.stages.student import StudentConfig
    from kdforge.stages.student import run as run_student

    out = root / "op-student-depth20"
    if not (out / "meta.json").is_file():
        log("building the demo's student (depth, 20 layers)")
        with stdout_to_stderr():
            run_student(StudentConfig(teacher=TEACHER, out=str(out), method="depth", num_layers=20), overwrite=True)
    return out


class ReferenceTimer:
    """Seconds spent in the DPO run's reference scoring (kdforge.distill.preference_step.reference_logps, called
    once at its set-up): timing only, the function itself is unchanged."""

    def __init__(self):
        self.seconds = 0.0

    @contextlib.contextmanager
    def active(self):
        from kdforge.distill import preference_step

        orig = preference_step.reference_logps

        def timed(*a, **kw):
            t = time.perf_counter()
            try:
                return orig(*a, **kw)
            finally:
                self.seconds += time.perf_counter() - t

        preference_step.reference_logps = timed
        try:
            yield self
        finally:
            preference_step.reference_logps = orig


def log_rows(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines() if x.strip()]


def step_seconds(out: Path) -> list[float]:
    return [r["seconds"] for r in log_rows(out) if "seconds" in r]


def distill(out: Path, student: Path, data: Path, **kw) -> dict:
    """A `kdforge distill` run (the COMMON settings unless ``kw`` says otherwise); its metrics."""
    from kdforge.stages.distill import DistillConfig
    from kdforge.stages.distill import run as run_distill

    kw = COMMON | {"teacher": TEACHER, "warmup_steps": warmup(kw["max_steps"])} | kw
    cfg = DistillConfig(student=str(student), data=str(data), out=str(out), **kw)
    log(f"distill {out.name}: {cfg.max_steps} steps, objective {cfg.objective}, on_policy {kw.get('on_policy', 0)}")
    with stdout_to_stderr():
        return run_distill(cfg, overwrite=True)


def dpo(out: Path, student: Path, prefs_dir: Path, steps: int, lr: float, seed: int) -> tuple[dict, float]:
    """`kdforge distill --objective dpo` on a prefs folder; its metrics and the reference scoring's seconds."""
    timer = ReferenceTimer()
    with timer.active():
        m = distill(out, student, prefs_dir, teacher=None, objective="dpo", preference=DPO, max_steps=steps, lr=lr,
                    seed=seed)
    return m, timer.seconds


def prefs(out: Path, sampler: Path, data: Path, n_prompts: int, max_new_tokens: int, seed: int) -> dict:
    from kdforge.stages.prefs import PrefsConfig
    from kdforge.stages.prefs import run as run_prefs

    cfg = PrefsConfig(data=str(data), sampler=str(sampler), teacher=TEACHER, out=str(out), split="train",
                      limit=n_prompts, max_new_tokens=max_new_tokens, seed=seed, **PREFS)
    log(f"prefs {out.name}: {n_prompts} prompts x {cfg.num_samples} samples")
    with stdout_to_stderr():
        return run_prefs(cfg, overwrite=True)


def warmup(steps: int) -> int:
    """Warmup steps of every run: a tenth of its steps, at least 1 (the runs are short: ~10-30 steps)."""
    return max(1, steps // 10)


def prefs_seconds(m: dict) -> float:
    return m["seconds_sampling_this_run"] + m["seconds_ranking_this_run"]


def calibrated(secs: list[float]) -> float:
    return statistics.median(secs[1:] if len(secs) > 1 else secs)


def on_policy_steps_for(budget: float, t_off: float, t_on: float, seed: int) -> tuple[int, int]:
    """The largest max_steps whose calibrated time fits ``budget`` (this seed's exact on/off draws); and how many
    of them are on-policy."""
    from kdforge.distill.on_policy import is_on_policy

    total, n, on = 0.0, 0, 0
    while True:
        o = is_on_policy(seed, n, ON_POLICY)
        dt = t_on if o else t_off
        if total + dt > budget:
            break
        total, n, on = total + dt, n + 1, on + o
    return (n, on) if n else (1, int(is_on_policy(seed, 0, ON_POLICY)))


# ---------------------------------------------------------------- scores

def task_items(per_type: int) -> list:
    """``per_type`` items of each type (short, code), evenly spaced through the bundled task file."""
    from kdforge.eval.tasks import load_tasks

    items = load_tasks()
    out = []
    for kind in ("short", "code"):
        group = [it for it in items if it.type == kind]
        k = min(per_type, len(group))
        out += [group[(j * len(group)) // k] for j in range(k)]
    return out


def rep4(tokens: list[int]) -> float:
    """Share of an answer's 4-grams that repeat an earlier 4-gram of the same answer."""
    grams = [tuple(tokens[i:i + 4]) for i in range(len(tokens) - 3)]
    return (len(grams) - len(set(grams))) / len(grams) if grams else 0.0


class Scorer:
    """Scores a model (sharing the teacher's tokenizer) on the validation conversations and the task items."""

    @torch.inference_mode()
    def __init__(self, val: list, items: list, max_new_tokens: int, batch: int = 8):
        import torch.nn.functional as F

        from kdforge.data.batching import collate, shared_vocab_size
        from kdforge.data.chat import encode_conversation, encode_prompt
        from kdforge.models.forward import target_logits
        from kdforge.models.loading import load_model

        self.teacher, self.tok = load_model(TEACHER, device="cpu", dtype="float32")
        self.teacher.eval()
        self.val, self.items, self.max_new, self.vocab = val, items, max_new_tokens, shared_vocab_size(self.tok,
                                                                                                     self.teacher)
        encs = [encode_conversation(self.tok, c.messages) for c in val]  # never cut
        self.batches = [collate(encs[i:i + batch], self.tok.pad_token_id) for i in range(0, len(encs), batch)]
        # The teacher's logits at the answer tokens, once: (N, V) fp32 per batch (~0.6 GB for 32 answers).
        self.t_logits = [target_logits(self.teacher, b["input_ids"], b["attention_mask"], b["labels"], self.vocab,
                                       PACK) for b in self.batches]
        n = sum(t.shape[0] for _, t in self.t_logits)
        self.teacher_nll = sum(float(F.cross_entropy(lg.float(), t, reduction="sum")) for lg, t in self.t_logits) / n
        self.prompts = [encode_prompt(self.tok, c.prompt_messages) for c in val]

    @torch.inference_mode()
    def teacher_forced(self, model) -> dict:
        """KL(teacher || model) at T=1, top-1 agreement and the model's NLL, per answer token of the teacher."""
        import torch.nn.functional as F

        from kdforge.distill.losses import divergence
        from kdforge.models.forward import target_logits

        kl = top1 = nll = 0.0
        n = 0
        for b, (t_logits, targets) in zip(self.batches, self.t_logits):
            s_logits, _ = target_logits(model, b["input_ids"], b["attention_mask"], b["labels"], self.vocab, PACK)
            kl += float(divergence(s_logits, t_logits, "forward_kl", chunk_size=1024).sum())
            top1 += float((s_logits.argmax(-1) == t_logits.argmax(-1)).sum())
            nll += float(F.cross_entropy(s_logits.float(), targets, reduction="sum"))
            n += targets.numel()
        return {"tf_kl": kl / n, "tf_top1": top1 / n, "tf_nll": nll / n, "tf_tokens": n}

    @torch.inference_mode()
    def score(self, model) -> dict:
        from kdforge.data.chat import IGNORE_INDEX, EncodedConversation
        from kdforge.eval.tasks import run_tasks
        from kdforge.runtime.sampling import SamplingParams
        from kdforge.runtime.transformers import TransformersRuntime
        from kdforge.scoring import agreement

        t0 = time.time()
        out = self.teacher_forced(model)
        rt = TransformersRuntime(model, self.tok)
        stops = rt.stop_ids()
        answers = rt.generate(self.prompts, SamplingParams(max_tokens=self.max_new, temperature=0.0), stops,
                              batch_size=32, keep_stop=True)
        gen = [EncodedConversation(p + a, [IGNORE_INDEX] * len(p) + a) for p, a in zip(self.prompts, answers) if a]
        # The teacher scores exactly the student's tokens (and the student itself: its KL at them).
        rows = agreement(self.teacher, [self.teacher, model], gen, self.tok.pad_token_id, self.vocab)
        out |= {"gen_teacher_nll": rows[0]["nll"], "gen_kl": rows[1]["kl"],
                "gen_tokens": statistics.fmean(len(a) for a in answers),
                "gen_finished": statistics.fmean(bool(a) and a[-1] in stops for a in answers),
                "gen_rep4": statistics.fmean(rep4([t for t in a if t not in stops]) for a in answers),
                "gen_scored_tokens": rows[0]["tokens"]}
        if self.items:
            s = run_tasks(model, self.tok, self.items, batch_size=16, short_tokens=32, code_tokens=128)["summary"]
            out |= {"task": s["overall"], "task_short": s["short_em"], "task_code": s["code_pass"]}
        out["score_s"] = time.time() - t0
        return {k: round(v, 4) if isinstance(v, float) else v for k, v in out.items()}

    def score_folder(self, path: Path) -> dict:
        from kdforge.models.loading import load_model

        model, _ = load_model(str(path), device="cpu", dtype="float32")
        model.eval()
        try:
            return self.score(model)
        finally:
            del model


# ---------------------------------------------------------------- summary

def summarize(per_seed: list[dict]) -> tuple[dict, dict, dict]:
    means, spread = {}, {}
    for a in ARMS:
        means[a], spread[a] = {}, {}
        for k in (*REPORTED, "budget_used_s"):
            vals = [r[a][k] for r in per_seed if r[a].get(k) is not None]
            if len(vals) != len(per_seed):
                continue
            means[a][k] = round(statistics.fmean(vals), 4)
            spread[a][k] = {"min": round(min(vals), 4), "max": round(max(vals), 4),
                            "std": round(statistics.stdev(vals), 4) if len(vals) > 1 else None}
    n = len(per_seed)
    best, vs_off = {}, {}
    for k, higher in RANKED.items():
        if not all(k in r[a] for r in per_seed for a in ARMS):
            continue
        counts = dict.fromkeys(ARMS, 0)
        for r in per_seed:
            vals = {a: r[a][k] for a in ARMS}
            top = max(vals.values()) if higher else min(vals.values())
            winners = [a for a, v in vals.items() if v == top]
            if len(winners) == 1:  # a tie is nobody's win
                counts[winners[0]] += 1
        best[k] = {a: f"{c}/{n}" for a, c in counts.items()}
        better = (lambda x, y: x > y) if higher else (lambda x, y: x < y)
        vs_off[k] = {a: f"{sum(better(r[a][k], r['off_policy'][k]) for r in per_seed)}/{n}"
                     for a in ("on_policy", "kd_then_dpo")}
    return means, spread, {"best_of_three": best, "beats_off_policy": vs_off}


# ---------------------------------------------------------------- main

def main() -> None:
    t_start = time.time()
    load_at_start = os.getloadavg()
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--budget-s", type=float, default=150.0, help="training seconds per arm and seed")
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--train", type=int, default=120, help="teacher-answered train conversations")
    ap.add_argument("--val", type=int, default=32, help="held-out validation conversations scored")
    ap.add_argument("--tasks", type=int, default=4, help="task items of each type (short, code); 0: no task score")
    ap.add_argument("--max-new-tokens", type=int, default=96, help="the teacher answers' cap, the rollouts', "
                    "prefs' and the scored greedy answers'")
    ap.add_argument("--kd-fraction", type=float, default=0.6, help="kd_then_dpo: the KD stage's share of the budget")
    ap.add_argument("--dpo-lr", type=float, default=3e-5)
    ap.add_argument("--calib-steps", type=int, default=4, help="steps of the off-policy and DPO timing runs")
    ap.add_argument("--calib-on-steps", type=int, default=3, help="steps of the on-policy timing run")
    ap.add_argument("--calib-prompts", type=int, default=4, help="prompts of the prefs timing run")
    ap.add_argument("--teacher-ref", action="store_true",
                    help="also score the teacher itself with every measure (its greedy answers, its task score)")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (see the protocol)")
    ap.add_argument("--workdir", default=str(Path.home() / ".cache" / "kdforge" / "bench"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    root = Path(args.workdir)
    root.mkdir(parents=True, exist_ok=True)

    from kdforge.data.formats import load_training_data, select_split

    with stdout_to_stderr():
        # The cached 120/48 folder of the other benchmarks serves smaller runs too (the first N of each split).
        gen = teacher_answers(root, max(args.train, 120), max(args.val, 48), args.max_new_tokens)
    data = subset_data(gen, root, args.train, args.val)
    convs = load_training_data(data)
    n_train = len(select_split(convs, "train"))
    val = [c for c in select_split(convs, "validation") if c.has_answer]
    items = task_items(args.tasks) if args.tasks else []
    student0 = demo_student(root)
    data_s = round(time.time() - t_start, 1)
    busy: list[dict] = []

    def sample_load(what: str) -> None:
        busy.append({"before": what, "others_cpu_cores": others_cpu(1.0),
                     "loadavg_1m": round(os.getloadavg()[0], 2)})
        log(f"load before {what}: {busy[-1]}")

    # ---- calibration (seed 0, the starting student)
    cal = root / "op-calib"
    sample_load("calibration")
    distill(cal / "off", student0, data, max_steps=args.calib_steps, seed=0)
    t_off = calibrated(step_seconds(cal / "off"))
    distill(cal / "on", student0, data, max_steps=args.calib_on_steps, seed=0, on_policy=1.0,
            rollout={"temperature": 1.0, "top_p": 1.0, "max_new_tokens": args.max_new_tokens})
    on_rows = log_rows(cal / "on")
    t_on = calibrated([r["seconds"] for r in on_rows])
    pm = prefs(cal / "prefs", student0, data, min(args.calib_prompts, n_train), args.max_new_tokens, 0)
    s_prompt = prefs_seconds(pm) / max(pm["prompts"], 1)
    dm, ref_s = dpo(cal / "dpo", student0, cal / "prefs", args.calib_steps, args.dpo_lr, 0)
    t_dpo = calibrated(step_seconds(cal / "dpo"))
    s_ref = ref_s / max(dm["train_examples"], 1)
    calibration = {"off_step_s": round(t_off, 4), "on_step_s": round(t_on, 4),
                   "on_gen_s_per_step": round(statistics.fmean(r.get("gen_s", 0.0) for r in on_rows[1:] or on_rows), 4),
                   "on_gen_tokens_per_step": round(statistics.fmean(r.get("gen_tokens", 0) for r in on_rows), 1),
                   "prefs_s_per_prompt": round(s_prompt, 4), "dpo_step_s": round(t_dpo, 4),
                   "reference_s_per_pair": round(s_ref, 4), "calib_prefs_pairs": pm["pairs"]}
    log(f"calibration {calibration}")
    B = args.budget_s
    rest = (1 - args.kd_fraction) * B
    n_p = int(rest / (s_prompt + s_ref + t_dpo * DPO_EPOCHS_PLANNED / COMMON["batch_size"]))
    n_p = max(2, min(n_train, n_p))
    plan = {"off_policy_steps": max(1, math.floor(B / t_off)),
            "on_policy_steps": {s: on_policy_steps_for(B, t_off, t_on, s) for s in range(args.seeds)},
            "kd_stage_steps": max(1, math.floor(args.kd_fraction * B / t_off)), "prefs_prompts": n_p}
    log(f"plan {plan}")

    # ---- scorer and references
    scorer = Scorer(val, items, args.max_new_tokens)
    log("scoring the starting student")
    reference = {"student_start": scorer.score_folder(student0)}
    log(f"reference student_start {reference['student_start']}")
    reference["teacher_nll_own_answers"] = round(scorer.teacher_nll, 4)
    if args.teacher_ref:
        reference["teacher"] = scorer.score(scorer.teacher)
        log(f"reference teacher {reference['teacher']}")

    # ---- the arms
    per_seed = []
    for seed in range(args.seeds):
        row: dict = {"seed": seed}
        out = root / f"op-off-seed{seed}"
        sample_load(f"off_policy seed {seed}")
        m = distill(out, student0, data, max_steps=plan["off_policy_steps"], seed=seed)
        secs = step_seconds(out)
        row["off_policy"] = {"steps": m["steps"], "train_s": round(sum(secs), 2), "budget_used_s": round(sum(secs), 2),
                             "target_tokens": m["target_tokens_this_run"]} | scorer.score_folder(out)
        log(f"seed {seed} off_policy {row['off_policy']}")

        out = root / f"op-on-seed{seed}"
        sample_load(f"on_policy seed {seed}")
        steps, planned_on = plan["on_policy_steps"][seed]
        m = distill(out, student0, data, max_steps=steps, seed=seed, on_policy=ON_POLICY,
                    rollout={"temperature": 1.0, "top_p": 1.0, "max_new_tokens": args.max_new_tokens})
        rows = log_rows(out)
        secs = [r["seconds"] for r in rows]
        row["on_policy"] = {"steps": m["steps"], "on_policy_steps": sum(r.get("on_policy_steps", 0) for r in rows),
                            "planned_on_policy_steps": planned_on,
                            "gen_tokens_train": sum(r.get("gen_tokens", 0) for r in rows),
                            "gen_s_train": round(sum(r.get("gen_s", 0.0) for r in rows), 2),
                            "train_s": round(sum(secs), 2), "budget_used_s": round(sum(secs), 2),
                            "target_tokens": m["target_tokens_this_run"]} | scorer.score_folder(out)
        log(f"seed {seed} on_policy {row['on_policy']}")

        kd_out, pref_out, dpo_out = (root / f"op-kd-seed{seed}", root / f"op-prefs-seed{seed}",
                                     root / f"op-dpo-seed{seed}")
        sample_load(f"kd_then_dpo seed {seed}")
        m = distill(kd_out, student0, data, max_steps=plan["kd_stage_steps"], seed=seed)
        kd_s = sum(step_seconds(kd_out))
        pm = prefs(pref_out, kd_out, data, n_p, args.max_new_tokens, seed)
        p_s = prefs_seconds(pm)
        left = B - kd_s - p_s - s_ref * pm["pairs"]
        dpo_steps = max(1, math.floor(left / t_dpo))
        dm, ref_s = dpo(dpo_out, kd_out, pref_out, dpo_steps, args.dpo_lr, seed)
        dpo_rows = log_rows(dpo_out)
        d_s = sum(r["seconds"] for r in dpo_rows)
        final = dpo_rows[-1] if dpo_rows else {}
        row["kd_then_dpo"] = {
            "kd_steps": m["steps"], "kd_train_s": round(kd_s, 2), "prefs_prompts": pm["prompts"],
            "prefs_pairs": pm["pairs"], "prefs_skipped": pm["skipped"], "prefs_s": round(p_s, 2),
            "prefs_mean_score_gap": pm["mean_score_gap"],
            "chosen_from_teacher": _chosen_from_data(pref_out), "dpo_steps": dpo_steps,
            "dpo_train_s": round(d_s, 2), "dpo_reference_s": round(ref_s, 2),
            "dpo_final": {k: round(final[k], 4) for k in ("loss", "accuracy", "margin", "chosen_reward",
                                                          "rejected_reward") if k in final},
            "budget_used_s": round(kd_s + p_s + ref_s + d_s, 2),
            "target_tokens_kd": m["target_tokens_this_run"]} | scorer.score_folder(dpo_out)
        log(f"seed {seed} kd_then_dpo {row['kd_then_dpo']}")
        per_seed.append(row)
    sample_load("end")

    means, spread, wins = summarize(per_seed)
    result = {
        "means": means, "spread": spread, "wins": wins, "per_seed": per_seed, "reference": reference,
        "calibration": calibration, "plan": plan, "others_cpu_cores": busy,
        "protocol": {
            "teacher": TEACHER, "student": "demo: method depth, 20 of 30 layers (block influence)",
            "data": str(data), "from": str(gen), "train_conversations": n_train, "val_conversations": len(val),
            "max_new_tokens": args.max_new_tokens, "budget_s": B, "seeds": args.seeds,
            "distill": COMMON | {"teacher": "live", "lr_schedule": "cosine", "min_lr_ratio": 0.1,
                                 "warmup_steps": "max(1, max_steps // 10)"},
            "on_policy": {"on_policy": ON_POLICY, "rollout": {"temperature": 1.0, "top_p": 1.0,
                                                              "max_new_tokens": args.max_new_tokens},
                          "alpha_on_policy_steps": 0.0},
            "kd_then_dpo": {"kd_fraction": args.kd_fraction, "prefs": PREFS | {"max_new_tokens": args.max_new_tokens,
                                                                             "split": "train", "limit": n_p},
                            "dpo": DPO | {"lr": args.dpo_lr, "batch_size": 4, "warmup": "max(1, max_steps // 10)",
                                          "epochs_planned": DPO_EPOCHS_PLANNED},
                            "budget": "KD step seconds + prefs sampling/ranking seconds + DPO reference scoring "
                                      "seconds + DPO step seconds"},
            "calibration": {"calib_steps": args.calib_steps, "calib_on_steps": args.calib_on_steps,
                            "calib_prompts": args.calib_prompts, "step_time": "median of per-step seconds but the "
                            "first, on the starting student, seed 0"},
            "tasks": {"per_type": args.tasks, "items": len(items), "ids": [it.id for it in items]},
            "scores": "tf_*: teacher-forced on the teacher's validation answers (KL(teacher||student) at T=1, "
                      "top-1, student NLL); gen_*: the student's greedy answers (<= max_new_tokens) to the "
                      "validation prompts, gen_teacher_nll = the teacher's mean NLL of exactly those tokens "
                      "(end-of-turn included when generated), gen_kl = KL(teacher||student) at them",
            "data_s": data_s, "load_average_at_start": [round(x, 2) for x in load_at_start],
            "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
        },
        "seconds": round(time.time() - t_start, 1),
    }
    print(json.dumps(result))


def _chosen_from_data(prefs_dir: Path) -> float | None:
    """Share of the DPO pairs whose chosen answer is the data's (the teacher's) own answer."""
    path = prefs_dir / "pairs.jsonl"
    rows = [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.is_file() else []
    return round(statistics.fmean(r.get("chosen_from") == "data" for r in rows), 4) if rows else None


if __name__ == "__main__":
    main()
