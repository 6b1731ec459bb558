"""Hugging Face model cards (README.md) for the model folders kdforge writes (docs/model-cards.md).

:func:`render_card` is pure: a :class:`Card` (the facts) in, the card's text out. The rest gathers the
facts from what a stage knows and the folders it read (the teacher's license and Hub id, the data's
record count and hash, the recipe, the training log, an eval's figures), and completes a model folder:
:func:`complete_model_folder` puts the chat template in both ``chat_template.jinja`` and
``tokenizer_config.json`` and every end-of-turn id in ``generation_config.json``.

``base_model`` in the YAML holds Hub ids only (the Hub reads it as a link; a local path means nothing to a
reader of the card): an embedded teacher's upstream repository, a folder in the Hugging Face cache
(``models--ORG--NAME``), or the ``base_model`` of a card the folder already carries (a kdforge student's, so
a distilled model names what its student was cut from). Local paths are named in the card's body instead.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from kdforge.artifacts import CONFIG_NAME, atomic_write_json, atomic_write_text, parent_entry, product, read_meta

CARD_NAME = "README.md"
MODEL_STAGES = ("student", "distill", "quantize")  # the stages whose folders are HF model folders with a card
# An ONNX Runtime GenAI folder (`kdforge export --to onnx`): no meta.json of its own; its facts are in kdforge.json.
ONNX_STAGE = "onnx"
ONNX_INFO = "kdforge.json"

# Embedded models' upstream repositories and licenses (kdforge.models.embedded ships their GGUF files).
KNOWN_MODELS = {"smollm2-135m-instruct": ("HuggingFaceTB/SmolLM2-135M-Instruct", "apache-2.0"),
                "gemma-3-270m": ("google/gemma-3-270m", "gemma")}
EMBEDDED_PREFIX = "embedded:"


@dataclass
class Card:
    """The facts a model card states; every field but ``name`` and ``stage`` may be empty."""

    name: str
    stage: str                                         # student | distill | quantize | onnx
    license: str | None = None                         # None: "other", with a sentence saying it is unknown
    license_from: str | None = None                    # where the license was read
    base_models: list[str] = field(default_factory=list)
    relation: str | None = "finetune"                  # the Hub has no "distillation" relation; None: left out
    tags: list[str] = field(default_factory=list)
    model: dict[str, Any] = field(default_factory=dict)     # architecture, parameters, layers, vocabulary
    teacher: dict[str, Any] | None = None              # spec, hub_id
    source: str | None = None                          # the folder this one was made from (distill, quantize)
    built: list[str] = field(default_factory=list)     # sentences: how it was made
    data: list[dict[str, Any]] = field(default_factory=list)  # role, path, records, sha256
    recipe: dict[str, Any] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)    # final train / validation figures
    evaluation: dict[str, Any] | None = None
    end_of_turn: list[int] = field(default_factory=list)
    library_name: str = "transformers"                 # what reads the folder (onnxruntime-genai for ONNX)
    roundtrip: dict[str, Any] = field(default_factory=dict)  # an export's figures against its source


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, list):
        return ", ".join(_fmt(x) for x in v)
    return "–" if v is None else str(v)


def _table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(_fmt(c) for c in r) + " |" for r in rows])


def front_matter(card: Card) -> dict[str, Any]:
    meta: dict[str, Any] = {"library_name": card.library_name, "pipeline_tag": "text-generation",
                            "license": card.license or "other"}
    if card.base_models:
        meta["base_model"] = card.base_models if len(card.base_models) > 1 else card.base_models[0]
        if card.relation:
            meta["base_model_relation"] = card.relation
    meta["tags"] = list(dict.fromkeys(["distillation", "kdforge", *card.tags]))
    return meta


def render_card(card: Card) -> str:
    """The README.md text: YAML front matter, then what the model is, how it was made, its figures, its use."""
    out = ["---", yaml.safe_dump(front_matter(card), sort_keys=False, allow_unicode=True).strip(), "---", "",
           f"# {card.name}", ""]
    what = {"student": "a student model cut from its teacher by kdforge, not yet distilled",
            "distill": "a student model distilled from its teacher by kdforge",
            "quantize": "a weight-quantised copy of a kdforge model",
            ONNX_STAGE: "an ONNX Runtime GenAI export of a model (graph and tokenizer for the CPU)"}[card.stage]
    if card.stage == ONNX_STAGE:
        out.append(f"This folder holds {what}. Written by `kdforge export --to onnx`; this card is generated from "
                   f"the folder's {ONNX_INFO} (docs/model-cards.md).")
    else:
        out.append(f"This folder holds {what}. Written by `kdforge {card.stage}`; this card is generated from the "
                   "folder's config.yaml, meta.json and training log (docs/model-cards.md).")
    if card.license is None:
        out += ["", "**License:** unknown. kdforge could not read the teacher's license (from its README.md, config "
                "or GGUF metadata), so the metadata says `other`; the teacher's terms apply to this model."]
    elif card.license_from:
        out += ["", f"**License:** `{card.license}`, the teacher's ({card.license_from})."]
    m = card.model
    if m:
        out += ["", "## Model", "", _table(["", ""], [[k, v] for k, v in m.items() if v is not None])]
    if card.teacher:
        t = card.teacher
        hub = f" (Hub: [{t['hub_id']}](https://huggingface.co/{t['hub_id']}))" if t.get("hub_id") else ""
        out += ["", "## Teacher", "", f"`{t['spec']}`{hub}."]
    if card.source:
        out += ["", f"Made from: `{card.source}`."]
    if card.built:
        out += ["", "## How it was built", ""] + [f"- {s}" for s in card.built]
    if card.data:
        out += ["", "## Data", "", _table(["role", "path", "records", "sha256"],
                                           [[d["role"], f"`{d['path']}`", d.get("records"), d.get("sha256")]
                                            for d in card.data])]
    if card.recipe:
        out += ["", "## Recipe", "", _table(["setting", "value"], [[k, v] for k, v in card.recipe.items()])]
    if card.roundtrip:
        out += ["", "## Round trip against the source", "",
                _table(["figure", "value"], [[k, v] for k, v in card.roundtrip.items()])]
    if card.training:
        out += ["", "## Training figures (last log rows)", "",
                _table(["figure", "value"], [[k, v] for k, v in card.training.items()])]
    if card.evaluation:
        out += ["", "## Evaluation", "", _evaluation(card.evaluation)]
    else:
        out += ["", "## Evaluation", "", "No `kdforge eval` has evaluated this folder yet; one that does rewrites "
                "this section with its figures."]
    out += ["", _usage(card)]
    return "\n".join(out).rstrip() + "\n"


EVAL_FIGURES = (("kl", "KL(teacher ‖ model), nats/token"), ("top1", "top-1 agreement with the teacher"),
                ("nll", "NLL of the teacher's answers"), ("bits_per_byte", "bits per byte"),
                ("tasks_overall", "task set score"), ("decode_tokens_per_s", "decode tokens/s (batch 1)"),
                ("ttft_ms", "time to first token, ms"), ("disk_mb", "size on disk, MiB"), ("rank", "rank by KL"))


def _evaluation(ev: dict[str, Any]) -> str:
    rows = [[label, ev["model"].get(k), ev.get("teacher", {}).get(k)] for k, label in EVAL_FIGURES
            if ev["model"].get(k) is not None]
    return (f"`kdforge eval` of {ev.get('created', '')} (report: `{ev['report']}`), on {ev.get('examples')} held-out "
            f"conversations of `{ev.get('data')}` (split {ev.get('split')}), {ev.get('models')} models compared:\n\n"
            + _table(["figure", "this model", "teacher"], rows))


def _usage(card: Card) -> str:
    if card.stage == ONNX_STAGE:
        return _onnx_usage(card)
    quant = card.stage == "quantize"
    return "\n".join([
        "## Use", "", "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
        'path = "PATH/TO/THIS/FOLDER"',
        "tok = AutoTokenizer.from_pretrained(path)",
        "model = AutoModelForCausalLM.from_pretrained(path)" + ("  # needs torchao installed" if quant else ""),
        'ids = tok.apply_chat_template([{"role": "user", "content": "Hello!"}], add_generation_prompt=True,',
        '                              return_tensors="pt", return_dict=True)',
        "out = model.generate(**ids, max_new_tokens=64)  # stops at every end-of-turn id (generation_config.json)",
        "print(tok.decode(out[0, ids['input_ids'].shape[1]:], skip_special_tokens=True))", "```", "",
        "- `kdforge serve PATH/TO/THIS/FOLDER`: an OpenAI-compatible server and a chat page.",
        *([] if quant else ["- `kdforge export PATH/TO/THIS/FOLDER --quant q8_0`: a GGUF file for llama.cpp / Ollama.",
                            "- `kdforge eval --teacher TEACHER --students PATH/TO/THIS/FOLDER --data DATA`: compare "
                            "it with its teacher (and write the figures into this card)."]),
        "", f"End-of-turn token ids: {_fmt(card.end_of_turn) if card.end_of_turn else '–'}."])


def _onnx_usage(card: Card) -> str:
    return "\n".join([
        "## Use", "", "```python", "import onnxruntime_genai as og  # pip install onnxruntime-genai",
        "from transformers import AutoTokenizer", "",
        'path = "PATH/TO/THIS/FOLDER"',
        "model = og.Model(path)",
        "tok = AutoTokenizer.from_pretrained(path)  # the source's tokenizer and chat template",
        'ids = tok.apply_chat_template([{"role": "user", "content": "Hello!"}], add_generation_prompt=True,',
        '                              return_dict=True)["input_ids"]',
        "params = og.GeneratorParams(model)",
        "params.set_search_options(max_length=len(ids) + 64)",
        "gen = og.Generator(model, params)",
        "gen.append_tokens(ids)",
        "answer = []",
        "while not gen.is_done():  # greedy; stops at every end-of-turn id (genai_config.json)",
        "    gen.generate_next_token()",
        "    answer.append(int(gen.get_next_tokens()[0]))",
        "print(tok.decode(answer, skip_special_tokens=True))", "```", "",
        "- `kdforge serve PATH/TO/THIS/FOLDER`: an OpenAI-compatible server (one request at a time) and a chat "
        "page; `kdforge chat PATH/TO/THIS/FOLDER` in the terminal.",
        "- `kdforge eval --teacher TEACHER --students PATH/TO/THIS/FOLDER --data DATA`: compare it with its "
        "teacher (and write the figures into this card).",
        "", f"End-of-turn token ids: {_fmt(card.end_of_turn) if card.end_of_turn else '–'}."])


# -- facts: the teacher, the data, the model -------------------------------------------------------------------

def read_front_matter(folder: str | Path) -> dict[str, Any]:
    """The YAML front matter of a folder's README.md ({} when it has none or it does not parse)."""
    p = Path(folder) / CARD_NAME
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return {}
    m = re.match(r"---\s*\n(.*?)\n---\s*(\n|$)", text, re.S)
    try:
        data = yaml.safe_load(m.group(1)) if m else None
    except yaml.YAMLError:
        return {}
    return data if isinstance(data, dict) else {}


def hub_id(spec: str | None) -> str | None:
    """The Hub repository a model spec stands for, where one is known (embedded models, the HF cache)."""
    if not spec:
        return None
    if spec.startswith(EMBEDDED_PREFIX):
        return KNOWN_MODELS.get(spec[len(EMBEDDED_PREFIX):], (None, None))[0]
    for part in Path(spec).parts:
        m = re.fullmatch(r"models--([^-][^/]*?)--(.+)", part)
        if m:
            return f"{m.group(1)}/{m.group(2)}"
    return None


def base_models(spec: str | None) -> list[str]:
    """The Hub ids a model derives from: its own Hub id, else the base_model of the card its folder carries."""
    own = hub_id(spec)
    if own:
        return [own]
    if spec and Path(spec).is_dir():
        b = read_front_matter(spec).get("base_model")
        return [b] if isinstance(b, str) else [x for x in b or [] if isinstance(x, str)]
    return []


def _gguf_license(path: Path) -> str | None:
    try:
        from gguf import GGUFReader

        f = GGUFReader(str(path)).fields.get("general.license")
        return str(f.contents()) if f is not None else None
    except Exception:  # an unreadable file: the license is unknown, the card says so
        return None


def model_license(spec: str | None) -> tuple[str | None, str | None]:
    """(license, where it was read) of a model spec; (None, None) when unknown."""
    if not spec:
        return None, None
    if spec.startswith(EMBEDDED_PREFIX):
        lic = KNOWN_MODELS.get(spec[len(EMBEDDED_PREFIX):], (None, None))[1]
        return (lic, f"{hub_id(spec)}'s license") if lic else (None, None)
    p = Path(spec)
    if p.is_file() and p.suffix.lower() == ".gguf":
        lic = _gguf_license(p)
        return (lic, "the GGUF file's general.license") if lic else (None, None)
    if not p.is_dir():
        return None, None
    lic = read_front_matter(p).get("license")
    if isinstance(lic, str) and lic:
        return lic, f"the license in {p.name}/README.md"
    try:
        cfg = json.loads((p / "config.json").read_text(encoding="utf-8"))
        if isinstance(cfg.get("license"), str):
            return cfg["license"], f"{p.name}/config.json"
    except (OSError, ValueError):
        pass
    try:  # kdforge's converted copy of an embedded GGUF names the file it came from
        src = json.loads((p / "kdforge_source.json").read_text(encoding="utf-8"))
        lic = _gguf_license(Path(src["gguf"]))
        return (lic, "the source GGUF file's general.license") if lic else (None, None)
    except (OSError, ValueError, KeyError, TypeError):
        return None, None


def _read_config(folder: str | Path) -> dict[str, Any]:
    try:
        return yaml.safe_load((Path(folder) / CONFIG_NAME).read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError):
        return {}


def data_facts(role: str, spec: str | None) -> dict[str, Any] | None:
    """A data input as the card lists it: its path, records (lines of its JSONL) and sha256."""
    if not spec:
        return None
    from kdforge.data.formats import data_file

    entry: dict[str, Any] = {"role": role, "path": spec}
    try:
        f = data_file(spec) if Path(spec).exists() else None
    except ValueError:
        f = None
    if f is not None and f.is_file():
        e = parent_entry(f)
        with open(f, "rb") as fh:
            entry["records"] = sum(1 for line in fh if line.strip())
        entry["sha256"] = e.get("sha256")
        if Path(spec).is_dir():
            entry["generated_by"] = _read_config(spec).get("model")
    elif Path(spec).is_dir():
        entry["sha256"] = f"meta.json {parent_entry(spec).get('meta_sha256')}"
    return entry


def model_facts(folder: str | Path, params: int | None = None) -> dict[str, Any]:
    """Architecture figures from a folder's config.json (and parameters, counted by the caller or read from the
    safetensors headers when the weights are not quantised)."""
    try:
        cfg = json.loads((Path(folder) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    text = cfg.get("text_config") if isinstance(cfg.get("text_config"), dict) else cfg
    if params is None and "quantization_config" not in cfg:
        params = _safetensors_params(Path(folder))
    return {"architecture": ", ".join(cfg.get("architectures") or []) or cfg.get("model_type"),
            "parameters": f"{params:,} ({params / 1e6:.1f} M)" if params else None,
            "layers": text.get("num_hidden_layers"), "hidden size": text.get("hidden_size"),
            "FFN size": text.get("intermediate_size"),
            "attention heads / KV heads": (f"{text.get('num_attention_heads')} / {text.get('num_key_value_heads')}"
                                           if text.get("num_attention_heads") else None),
            "vocabulary": text.get("vocab_size"), "tied embeddings": text.get("tie_word_embeddings", cfg.get(
                "tie_word_embeddings")),
            "quantisation": (cfg.get("quantization_config") or {}).get("quant_method")}


def _safetensors_params(folder: Path) -> int | None:
    import struct

    total = 0
    for f in sorted(folder.glob("*.safetensors")):
        with open(f, "rb") as fh:
            header = json.loads(fh.read(struct.unpack("<Q", fh.read(8))[0]))
        for k, v in header.items():
            if k != "__metadata__":
                n = 1
                for d in v["shape"]:
                    n *= d
                total += n
    return total or None


def _schedule(v: Any) -> Any:
    """A dumped schedule (kdforge.distill.schedules) as a short phrase; other values unchanged."""
    if not isinstance(v, dict) or "kind" not in v:
        return v
    if v["kind"] == "constant":
        return v["value"]
    if v["kind"] == "step":
        return f"step {v['values']} at {v['boundaries']}"
    return f"{v['kind']} {v['start']} → {v['end']}"


# -- cards per stage ---------------------------------------------------------------------------------------

def student_card(folder: Path, config: dict[str, Any], meta: dict[str, Any], params: int | None = None) -> Card:
    metrics = meta.get("metrics") or {}
    teacher = config.get("teacher")
    lic, lic_from = model_license(teacher)
    card = Card(Path(config.get("out") or folder).name, "student", lic, lic_from, base_models(teacher),
                model=model_facts(folder, params or metrics.get("student_params")),
                teacher={"spec": teacher, "hub_id": hub_id(teacher)})
    method = meta.get("method") or config.get("method")
    kept = meta.get("kept_teacher_layers")
    how = {"layers": "a uniform subset of the teacher's layers (first and last kept)",
           "depth": "the teacher's layers of highest block influence on calibration data",
           "width": "the teacher pruned in width (FFN neurons, heads, hidden channels) by activation importance",
           "fresh": f"a smaller config of the teacher's architecture, weights {config.get('init', 'slice')}"}
    card.built.append(f"method `{method}`: {how.get(method, method)}; teacher layers kept: {_fmt(kept)} "
                      f"({metrics.get('student_layers')} of {metrics.get('teacher_layers')}).")
    if metrics.get("teacher_params"):
        card.built.append(f"parameters: {metrics.get('student_params'):,} of the teacher's "
                          f"{metrics['teacher_params']:,}.")
    card.tags.append("pruned" if method in ("layers", "depth", "width") else "small-config")
    if meta.get("trim_vocab") or config.get("trim_vocab"):
        card.tags.append("trimmed-vocabulary")
        card.built.append(f"vocabulary trimmed from {metrics.get('vocab_size_before')} to "
                          f"{metrics.get('vocab_size_after')} tokens (the ones `{config.get('trim_vocab')}` uses, plus "
                          "the chat template's, special and byte tokens); kdforge_vocab_map.json maps the ids to the "
                          "teacher's.")
        d = data_facts("vocabulary trim", config.get("trim_vocab"))
        card.data += [d] if d else []
    if meta.get("tokenizer"):
        card.tags.append("new-tokenizer")
        card.built.append(f"tokenizer replaced ({meta['tokenizer'].get('source')}): embedding rows built from the "
                          "teacher's for each new token's text.")
    if method in ("depth", "width"):
        card.data.append({"role": "calibration", "path": config.get("calibration"),
                          "records": config.get("calibration_samples")})
    return card


RECIPE_KEYS = ("objective", "loss", "alpha", "temperature", "kd_weight", "hidden_loss", "hidden_weight",
               "attention_loss", "attention_weight", "on_policy", "preset", "method", "max_steps", "batch_size",
               "grad_accum", "global_batch_size", "lr", "lr_schedule", "warmup_steps", "weight_decay", "max_length",
               "pack", "precision", "seed")


def distill_card(folder: Path, config: dict[str, Any], log_rows: list[dict[str, Any]],
                 params: int | None = None) -> Card:
    student = config.get("student")
    teacher = config.get("teacher")
    if teacher is None and config.get("labels"):
        teacher = _read_config(config["labels"]).get("teacher")  # the cache's teacher
    lic, lic_from = model_license(teacher)
    if lic is None and teacher is None:  # preference objectives: no teacher; the student's license holds
        lic, lic_from = model_license(student)
    bases = list(dict.fromkeys(base_models(student) + base_models(teacher)))
    card = Card(Path(config.get("out") or folder).name, "distill", lic, lic_from, bases,
                model=model_facts(folder, params),
                teacher={"spec": teacher, "hub_id": hub_id(teacher)} if teacher else None)
    recipe = {k: _schedule(config.get(k)) for k in RECIPE_KEYS if config.get(k) not in (None, "none")}
    for term in ("hidden", "attention"):  # a weight of a term that is off says nothing
        if config.get(f"{term}_loss", "none") == "none":
            recipe.pop(f"{term}_weight", None)
    if recipe.get("on_policy") in (0, 0.0):
        recipe.pop("on_policy")
    else:
        rollout = config.get("rollout") or {}
        recipe["rollout"] = (f"T {rollout.get('temperature')}, top-p {rollout.get('top_p')}, "
                             f"{rollout.get('max_new_tokens')} tokens")
        card.tags.append("on-policy")
    if config.get("loss") == "jsd":
        recipe["jsd_beta"] = config.get("jsd_beta")
    if config.get("method") == "lora":
        recipe["lora"] = config.get("lora")
        card.tags.append("lora")
    if (config.get("taid") or {}).get("schedule", "off") != "off":
        recipe["taid"] = config["taid"]
    if _schedule((config.get("consistency") or {}).get("weight")) not in (0, 0.0, None):
        recipe["consistency"] = {k: _schedule(v) for k, v in config["consistency"].items()}
    if config.get("objective") in ("dpo", "kto", "distillm2"):
        recipe["preference"] = config.get("preference")
        card.tags.append(config["objective"])
    if config.get("self_distill"):
        card.tags.append("self-distillation")
    card.recipe = recipe
    signal = ("a soft-label cache" if config.get("labels") else "a served teacher" if str(teacher).startswith(
        ("http://", "https://")) else "the live teacher" if teacher else "ranked answers (no teacher)")
    card.built.append(f"distilled from {signal} for {config.get('max_steps')} optimizer steps, starting from "
                      f"`{student}`.")
    if (Path(student or "") / "kdforge_vocab_map.json").is_file():
        card.tags.append("trimmed-vocabulary")
    try:  # a kdforge student: how it was cut from its teacher
        s_meta = read_meta(student) if student else {}
    except (FileNotFoundError, ValueError):
        s_meta = {}
    if s_meta.get("stage") == "student":
        card.built += [f"the student: {line}" for line in student_card(Path(student), _read_config(student),
                                                                       s_meta).built]
    card.data += [d for d in (data_facts("training conversations", config.get("data")),
                              data_facts("soft labels", config.get("labels"))) if d]
    card.training = training_figures(log_rows)
    return card


def training_figures(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The final train row's terms and the last validation figures of a train_log.jsonl."""
    train = next((r for r in reversed(rows) if "loss" in r), None)
    val = next((r for r in reversed(rows) if "val_kl" in r or "val_ce" in r), None)
    out: dict[str, Any] = {}
    if train:
        out |= {f"train {k} (step {train['step']})": train[k] for k in ("loss", "ce", "soft", "hidden", "attention")
                if train.get(k)}
        out["epoch"] = train.get("epoch")
    if val:
        out |= {f"validation {k[4:]} (step {val['step']})": val[k] for k in ("val_ce", "val_kl", "val_top1")
                if k in val}
    return out


def quantize_card(folder: Path, config: dict[str, Any], meta: dict[str, Any]) -> Card:
    source = config.get("model")
    lic, lic_from = model_license(source)
    own = hub_id(source)
    card = Card(Path(config.get("out") or folder).name, "quantize", lic, lic_from,
                [own] if own else base_models(source), relation="quantized" if own else "finetune",
                tags=["quantized", "torchao" if config.get("method") in ("int8", "int8-dynamic", "int4", "int8-int4")
                      else "bitsandbytes"], model=model_facts(folder), source=source)
    if lic_from:
        card.license_from = f"the source model's: {lic_from}"
    m = meta.get("metrics") or {}
    card.built.append(f"weights quantised with `{config.get('method')}`"
                      + (f" (group size {config.get('group_size')})" if "int4" in str(config.get("method")) else "")
                      + f" from `{source}`.")
    card.recipe = {"method": config.get("method"), "group_size": config.get("group_size")}
    card.training = {k: m[k] for k in ("bytes", "top1", "kl", "nll_delta", "decode_tokens_per_s",
                                       "source_decode_tokens_per_s") if k in m}
    return card


ONNX_QUANT_WORDS = {"fp32": "fp32 weights: the source's arithmetic",
                    "int8": "MatMul weights as int8 `MatMulNBits` blocks",
                    "int4": "MatMul weights as int4 `MatMulNBits` blocks"}
ROUNDTRIP_FIGURES = (("top1", "top-1 agreement with the source (its answers)"),
                     ("kl", "KL(source ‖ export), nats/token"), ("nll_delta", "ΔNLL of the source's answers"),
                     ("max_abs_diff", "max |Δlogit|"), ("top1_prompt_text", "top-1 agreement on prompt text"),
                     ("tokenizer_match", "tokenizer read back: same ids"),
                     ("genai_tokenizer_match", "ORT GenAI's tokenizer: same ids"))


def is_onnx_model_folder(folder: str | Path) -> bool:
    """A folder `kdforge export --to onnx` wrote: genai_config.json and kdforge.json."""
    folder = Path(folder)
    return (folder / "genai_config.json").is_file() and (folder / ONNX_INFO).is_file()


def onnx_card(folder: str | Path, evaluation: dict[str, Any] | None = None) -> Card:
    """The card of an ONNX Runtime GenAI folder from its kdforge.json (source, quant, parameters, builder options,
    round trip; kdforge.export.onnx writes it) and config.json."""
    folder = Path(folder)
    info = json.loads((folder / ONNX_INFO).read_text(encoding="utf-8"))
    source, quant = info.get("source"), info.get("quant")
    lic, lic_from = model_license(source)
    own = hub_id(source)
    quantised = quant not in (None, "fp32")
    # A Hub model converted: "quantized" when int8/int4, no relation for an fp32 conversion (the Hub infers it);
    # a local kdforge model: its own bases, of which it is a fine-tune (as a quantize folder's card says).
    bases, relation = ([own], "quantized" if quantised else None) if own else (base_models(source), "finetune")
    card = Card(Path(folder).name, ONNX_STAGE, lic, lic_from, bases, relation=relation,
                tags=["onnx", "onnxruntime-genai", *([quant] if quant else []), *(["quantized"] if quantised else [])],
                model=model_facts(folder, info.get("parameters")), source=source, library_name="onnxruntime-genai")
    if lic_from:
        card.license_from = f"the source model's: {lic_from}"
    card.model["quantisation"] = f"ONNX {quant}" if quant else None
    builder = info.get("builder") or {}
    options = builder.get("options") or {}
    opts = ", ".join(f"`{k}={v}`" for k, v in options.items()) or "its defaults"
    card.built.append(f"exported from `{source}` by `kdforge export --to onnx --quant {quant}`: the ONNX Runtime "
                      f"GenAI model builder for the CPU execution provider ({opts}"
                      + (f", {builder['seconds']} s" if builder.get("seconds") is not None else "") + ").")
    if quant in ONNX_QUANT_WORDS:
        card.built.append(f"{quant}: {ONNX_QUANT_WORDS[quant]}.")
    card.built.append("beside the graph (model.onnx, model.onnx.data): the source's HF tokenizer, config.json, "
                      "generation_config.json and genai_config.json with every end-of-turn id.")
    rt = info.get("roundtrip") or {}
    card.roundtrip = {label: rt[k] for k, label in ROUNDTRIP_FIGURES if rt.get(k) is not None}
    card.evaluation = evaluation
    card.end_of_turn = _generation_eos(folder)
    return card


def write_onnx_card(folder: str | Path, evaluation: dict[str, Any] | None = None) -> Path:
    """Write an ONNX Runtime GenAI folder's README.md (atomically) from its kdforge.json; returns its path."""
    path = Path(folder) / CARD_NAME
    atomic_write_text(path, render_card(onnx_card(folder, evaluation)))
    return path


def build_card(folder: str | Path, stage: str, config: dict[str, Any], meta: dict[str, Any] | None = None,
               log_rows: list[dict[str, Any]] | None = None, params: int | None = None,
               evaluation: dict[str, Any] | None = None) -> Card:
    """The card of a model folder written by ``stage``. ``folder``: where its config.json is; ``meta``: its
    meta.json (or what it will hold); ``log_rows``: distill's training log."""
    folder = Path(folder)
    meta = meta or {}
    if stage == "student":
        card = student_card(folder, config, meta, params)
    elif stage == "distill":
        card = distill_card(folder, config, log_rows or [], params)
    elif stage == "quantize":
        card = quantize_card(folder, config, meta)
    else:
        raise ValueError(f"no model card for stage {stage!r}")
    card.evaluation = evaluation
    card.end_of_turn = _generation_eos(folder)
    return card


def _generation_eos(folder: Path) -> list[int]:
    try:
        eos = json.loads((folder / "generation_config.json").read_text(encoding="utf-8")).get("eos_token_id")
    except (OSError, ValueError):
        return []
    return [eos] if isinstance(eos, int) else list(eos or [])


def write_model_card(folder: str | Path, stage: str, config: dict[str, Any], meta: dict[str, Any] | None = None,
                     log_rows: list[dict[str, Any]] | None = None, params: int | None = None,
                     evaluation: dict[str, Any] | None = None) -> Path:
    """Write ``folder``/README.md (atomically) for a model folder written by ``stage``; returns its path."""
    card = build_card(folder, stage, config, meta, log_rows, params, evaluation)
    path = Path(folder) / CARD_NAME
    atomic_write_text(path, render_card(card))
    return path


def refresh_model_card(folder: str | Path, evaluation: dict[str, Any] | None = None) -> bool:
    """Rewrite the card of a finished kdforge model folder from its own config.yaml, meta.json and training log,
    with ``evaluation`` (an eval's figures for it). False, writing nothing, when it is no such folder."""
    folder = Path(folder)
    if is_onnx_model_folder(folder):  # kdforge export --to onnx: the facts are in its kdforge.json
        write_onnx_card(folder, evaluation)
        return True
    try:
        meta = read_meta(folder)
    except (FileNotFoundError, ValueError):
        return False
    if meta.get("stage") not in MODEL_STAGES or not (folder / "config.json").is_file():
        return False
    rows: list[dict[str, Any]] = []
    log = product(folder, "log")
    if log is not None and log.is_file():
        from kdforge.artifacts import read_lines

        rows = [json.loads(x) for x in read_lines(log) if x.strip()]
    write_model_card(folder, meta["stage"], _read_config(folder), meta, rows, evaluation=evaluation)
    return True


def eval_figures(row: dict[str, Any]) -> dict[str, Any]:
    """One model's headline figures from an eval report's row (kdforge.stages.eval)."""
    out = {k: row.get(k) for k in ("kl", "top1", "nll", "bits_per_byte", "decode_tokens_per_s", "ttft_ms", "rank")}
    out["tasks_overall"] = (row.get("tasks") or {}).get("overall")
    out["disk_mb"] = (row.get("size") or {}).get("disk_mb")
    return out


def record_evaluation(report: dict[str, Any], report_dir: str | Path) -> list[str]:
    """After `kdforge eval`: rewrite the card of every evaluated student that is a kdforge model folder with its
    figures beside the teacher's (the first row). Returns the folders whose card was rewritten; one that cannot
    be written is skipped with a warning (the eval's own report is what counts)."""
    import time

    rows = report.get("models") or []
    if not rows:
        return []
    common = {"report": str(Path(report_dir).resolve() / "report.json"), "data": report.get("data"),
              "split": report.get("split"), "examples": report.get("examples"), "models": len(rows),
              "created": time.strftime("%Y-%m-%d", time.gmtime()), "teacher": eval_figures(rows[0])}
    done = []
    for row in rows[1:]:
        try:
            if Path(row["path"]).is_dir() and refresh_model_card(row["path"], common | {"model": eval_figures(row)}):
                done.append(row["path"])
        except OSError as e:
            print(f"[kdforge] WARNING: could not update the model card in {row['path']}: {e}", flush=True)
    return done


# -- the rest of a complete model folder ------------------------------------------------------------------------

def complete_model_folder(folder: str | Path, tokenizer, model=None) -> list[int]:
    """After ``save_pretrained``: the chat template in both ``chat_template.jinja`` (what transformers 5 writes)
    and ``tokenizer_config.json["chat_template"]`` (what older readers and other runtimes look for), and
    ``generation_config.json`` whose ``eos_token_id`` lists every end-of-turn id. Returns those ids."""
    from kdforge.models.loading import end_of_turn_ids

    folder = Path(folder)
    template = tokenizer.chat_template
    tc_path = folder / "tokenizer_config.json"
    if isinstance(template, str) and tc_path.is_file():
        jinja = folder / "chat_template.jinja"
        if not jinja.is_file() or jinja.read_text(encoding="utf-8") != template:
            atomic_write_text(jinja, template)
        tc = json.loads(tc_path.read_text(encoding="utf-8"))
        if tc.get("chat_template") != template:
            tc["chat_template"] = template
            atomic_write_json(tc_path, tc)
    ids = end_of_turn_ids(tokenizer, model)
    gen_path = folder / "generation_config.json"
    try:
        gen = json.loads(gen_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        cfg = getattr(model, "config", None)
        gen = {k: getattr(cfg, k, None) for k in ("bos_token_id", "pad_token_id")}
        gen = {k: v for k, v in gen.items() if v is not None}
    if ids:
        gen["eos_token_id"] = ids
        atomic_write_json(gen_path, gen)
    return ids
