"""pt-export: the frozen backbone to ONNX, once, with past-key-value inputs.

Stages: load the backbone (registry name, folder or .gguf) → optimum-onnx's
`text-generation-with-past` export → optional weight quantisation (int8, int4 with the
tied lm_head untied and quantised too) or fp16 → ONNX Runtime's offline graph
optimisation, saved with the model → parity check against PyTorch → manifest. The folder
is built beside its destination and renamed into place only when everything passed.
"""

from __future__ import annotations

import contextlib
import datetime
import importlib.metadata
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

from prefixkit.runtime.manifest import (
    ATTENTION_GQA,
    ATTENTION_KERNEL,
    FINGERPRINT_METADATA,
    MODEL_FILE,
    TOKENIZER_FILE,
    WEIGHTS_SUFFIX,
    GraphSpec,
    Manifest,
    ManifestError,
    load_manifest,
    save_manifest,
)
from prefixkit.runtime.session import ExportedBackbone

from .backbones import Backbone, load_backbone, quiet, say
from .parity import fp16_limit, fp32_limit

# Decoder-only families whose export reproduces PyTorch (each tested with a tiny model in
# tests/test_families.py); fused: those ONNX Runtime GenAI's model builder builds exactly (its
# phi3 build fails); traced: those only prefixkit's traced graph reproduces (traced.py says why).
FUSED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
TRACED_MODEL_TYPES = ("gemma2", "gemma3_text")
SUPPORTED_MODEL_TYPES = ("gpt2", *FUSED_MODEL_TYPES, "phi3", *TRACED_MODEL_TYPES)
GRAPHS = ("auto", "fused", "optimum", "traced")
# -a16, -a8: prefixkit's CPU kernel rounds activations to 16- or 8-bit integers (quantize.py:
# ACTIVATIONS); without a suffix they stay fp32, exact to the quantised weights.
QUANTIZATIONS = ("int8", "int4", "int8-a16", "int4-a16", "int8-a8", "int4-a8")
DTYPES = ("fp32", "fp16")
LM_HEAD_BITS = 8  # the output projection: logits are most sensitive to it (docs/DETAILS.md)
EXTERNAL_MIN_BYTES = 1024  # tensors from this size on are stored in the weights file


class ExportError(RuntimeError):
    """An export that cannot be done; the message says why and what to do."""


def export_backbone(
    backbone: str,
    out: str | Path,
    quantize: str | None = None,
    dtype: str = "fp32",
    optimize: bool = True,
    force: bool = False,
    graph: str = "auto",
) -> Manifest:
    """Export `backbone` into the folder `out` (model.onnx, manifest.json, tokenizer.json).

    graph: "fused" (ONNX Runtime GenAI's model builder: GroupQueryAttention, fused rotary and
    RMSNorm; Llama-family, built at fp32, then quantised or converted to fp16, whose
    GroupQueryAttention runs on CUDA), "optimum" (optimum-onnx's export, any supported
    backbone), or "auto": fused where it applies.
    Doing it again with the same backbone and settings does nothing; `force` redoes it.
    """
    if quantize not in (None, *QUANTIZATIONS):
        raise ExportError(f"unknown quantisation '{quantize}'; choose one of {', '.join(QUANTIZATIONS)}.")
    if dtype not in DTYPES:
        raise ExportError(f"unknown dtype '{dtype}'; choose one of {', '.join(DTYPES)}.")
    if quantize and dtype != "fp32":
        raise ExportError("--quantize works on fp32 exports; leave --dtype at fp32.")
    if graph not in GRAPHS:
        raise ExportError(f"unknown graph '{graph}'; choose one of {', '.join(GRAPHS)}.")
    out = Path(out)

    say(f"loading backbone {backbone}")
    loaded = load_backbone(backbone)
    model_type = loaded.architecture.model_type
    if loaded.architecture.is_encoder_decoder:
        if quantize or dtype != "fp32" or graph == "fused":
            raise ExportError(
                f"{model_type} is an encoder-decoder backbone: it exports as two fp32 graphs (encoder, "
                "decoder); --quantize, --dtype fp16 and --graph fused are for decoder-only backbones."
            )
        graph = "seq2seq"  # load_backbone has refused families other than BART and T5
    elif model_type not in SUPPORTED_MODEL_TYPES:
        raise ExportError(
            f"'{model_type}' backbones cannot be exported yet; supported: {', '.join(SUPPORTED_MODEL_TYPES)}."
        )
    head_dim = loaded.architecture.head_dim
    # The model builder's rotary caches ignore rope scaling (Llama 3's differed from PyTorch by 0.9
    # of the largest logit), and a quantised export's parity is not enforced: never fused.
    rope = getattr(loaded.model.config, "rope_scaling", None) or {}
    scaled = rope.get("rope_type", rope.get("type", "default")) != "default"
    fused_fits = model_type in FUSED_MODEL_TYPES and head_dim % 16 == 0 and not scaled
    traced = model_type in TRACED_MODEL_TYPES
    if traced and graph not in ("auto", "traced"):
        raise ExportError(f"neither the fused nor optimum's graph reproduces {model_type} backbones; "
                          "they export as prefixkit's traced graph (--graph auto or traced).")
    if graph == "traced" and not traced:
        raise ExportError(f"the traced graph is for {', '.join(TRACED_MODEL_TYPES)} backbones; "
                          f"{model_type} exports with --graph auto, fused or optimum.")
    if graph == "fused" and not fused_fits:
        raise ExportError(
            f"the fused graph is built for {', '.join(FUSED_MODEL_TYPES)} backbones whose head_dim is a "
            f"multiple of 16 (GroupQueryAttention's CPU kernel), without rope scaling; this is {model_type} "
            f"with head_dim {head_dim}{' and rope scaling' if scaled else ''}: use --graph optimum."
        )
    # Settings as asked (graph may be "auto"); the graph actually built is in the manifest.
    settings = {"quantize": quantize, "dtype": dtype, "optimize": optimize, "graph": graph}
    fallback = graph == "auto" and fused_fits  # fused first; optimum if fused fails its checks
    if graph == "auto":
        kind = "traced" if traced else "fused" if fused_fits else "optimum"
    else:
        kind = graph
    existing = _existing_export(out)
    if existing is not None and not force:
        if _same_export(existing, loaded.fingerprint, settings, kind):
            say(f"{out} already holds this export; nothing to do (--force to redo it)")
            return existing
        raise ExportError(
            f"{out} already holds another export ({existing.source.get('backbone')}, "
            f"{existing.source.get('settings')}); choose another --output or pass --force to replace it."
        )
    if existing is None and out.exists() and (not out.is_dir() or any(out.iterdir())) and not force:
        raise ExportError(f"{out} exists and is not an export folder; choose another --output or pass --force.")

    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        manifest = _export_beside(loaded, backbone, out, settings, kind)
    except ExportError as e:
        if not fallback:
            raise
        say(f"the fused graph did not pass ({e}); exporting optimum-onnx's graph instead")
        manifest = _export_beside(loaded, backbone, out, settings, "optimum")
    say(f"exported to {out}")
    return manifest


def _export_beside(loaded: Backbone, name: str, out: Path, settings: dict[str, Any], kind: str) -> Manifest:
    """Build the export in a temporary folder beside `out` and rename it into place."""
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    try:
        tmp.chmod(0o755)
        manifest = _export_into(loaded, name, tmp, settings, kind)
        _publish(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def _export_into(loaded: Backbone, name: str, folder: Path, settings: dict[str, Any], kind: str) -> Manifest:
    import onnx

    timings: dict[str, float] = {}
    if kind == "seq2seq":
        return _export_seq2seq(loaded, name, folder, settings, timings)
    raw = folder / "raw"
    if kind == "fused":
        with _stage("building the fused graph with ONNX Runtime GenAI's model builder", timings, "export"):
            _build_fused(loaded.path, raw)
            graph = GraphSpec(kind="genai-gqa", inputs=[], outputs=[], padding="right")
    elif kind == "traced":
        with _stage("tracing the backbone's forward with torch.onnx (masks from positions)", timings, "export"):
            from .traced import export_traced

            with quiet():
                export_traced(loaded.model, loaded.architecture, raw)
            graph = GraphSpec(kind="prefixkit-traced", inputs=[], outputs=[])
    else:
        with _stage("exporting with optimum-onnx (text-generation-with-past)", timings, "export"):
            with quiet():
                from optimum.exporters.onnx import main_export

                main_export(
                    str(loaded.path), output=str(raw), task="text-generation-with-past",
                    device="cpu", do_validation=False, library_name="transformers",
                )
            graph = GraphSpec(kind="optimum-decoder-with-past", inputs=[], outputs=[])
    model = onnx.load(str(raw / MODEL_FILE))
    graph.opset = max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    graph.inputs = [i.name for i in model.graph.input]
    graph.outputs = [o.name for o in model.graph.output]
    from .graph_edits import last_position_logits

    if last_position_logits(model):
        graph.logits = "last"

    if kind == "fused" and settings["dtype"] == "fp32":  # prefixkit's attention kernel is a CPU one, fp32
        from .quantize import use_attention_kernel

        # A sliding window or separate q, k, v (q/k norm) keep ONNX Runtime's GroupQueryAttention.
        graph.attention = ATTENTION_KERNEL if use_attention_kernel(model) else ATTENTION_GQA
    quantization = None
    if settings["quantize"]:
        with _stage(f"quantising weights to {settings['quantize']}", timings, "quantize"):
            model, quantization = _quantize(model, settings["quantize"])
    if settings["dtype"] == "fp16":
        with _stage("converting to fp16", timings, "fp16"):
            from onnxruntime.transformers.float16 import convert_float_to_float16

            model = convert_float_to_float16(model, keep_io_types=False, disable_shape_infer=True)
    onnx.helper.set_model_props(model, {FINGERPRINT_METADATA: loaded.fingerprint})
    _save_model(model, folder / MODEL_FILE)
    del model
    shutil.rmtree(raw)

    optimization: dict[str, Any] = {"offline": False}
    if settings["optimize"] and settings["dtype"] == "fp32":
        with _stage("optimising the graph offline with ONNX Runtime", timings, "optimize"):
            kernel_nodes = bool(quantization and quantization["kernel_nodes"]) or graph.attention == ATTENTION_KERNEL
            optimization = _optimize_offline(folder / MODEL_FILE, kernel_nodes)

    graph.weights_beside = (folder / (MODEL_FILE + WEIGHTS_SUFFIX)).is_file()
    manifest = _start_manifest(loaded, name, folder, settings, graph=graph,
                               dtype="float16" if settings["dtype"] == "fp16" else "float32",
                               quantization=quantization, optimization=optimization)

    layout = "left padding" if graph.padding == "left" else "prefill row by row, decode right-padded"
    with _stage(f"checking parity with PyTorch (prefixes 0/1/10, {layout})", timings, "parity"):
        from .parity import check_parity, describe

        try:
            exported = ExportedBackbone(folder)
        except Exception as e:
            if settings["dtype"] != "fp16":
                raise ExportError(f"the exported graph does not load in ONNX Runtime ({e}); nothing was written.") from None
            # fp16 is for GPU providers; the CPU may lack a kernel for it.
            report: dict[str, Any] = {"skipped": f"the graph does not run on the CPU here: {e}".splitlines()[0]}
            say(f"  parity not checked: {report['skipped']}")
        else:
            report = check_parity(loaded.model, loaded.tokenizer, exported)
            del exported
            for line in describe(report):
                say(f"  {line}")
    limit = None  # quantised exports differ by more than rounding: measured, not enforced
    if not settings["quantize"] and "skipped" not in report:
        limit = (fp16_limit if settings["dtype"] == "fp16" else fp32_limit)(loaded.model.config.to_dict())
    return _finish_manifest(folder, manifest, report, limit, timings, (MODEL_FILE,))


def _start_manifest(loaded: Backbone, name: str, folder: Path, settings: dict[str, Any], **fields) -> Manifest:
    """Write the tokenizer and a first manifest (the graph's fields, the backbone's identity,
    its special ids and where it came from), before the parity check."""
    tokenizer = loaded.tokenizer
    (folder / TOKENIZER_FILE).write_text(tokenizer.backend_tokenizer.to_str(), encoding="utf-8")
    eos_ids = sorted(loaded.eos_token_ids)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos_ids[0] if eos_ids else 0)
    manifest = Manifest(
        fingerprint=loaded.fingerprint,
        architecture=loaded.architecture,
        eos_token_ids=eos_ids,
        pad_token_id=int(pad),
        bos_token_id=tokenizer.bos_token_id,
        source={"backbone": str(name), "path": str(loaded.path), "settings": settings},
        versions=_versions(),
        created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        **fields,
    )
    save_manifest(folder, manifest)
    return manifest


def _finish_manifest(folder: Path, manifest: Manifest, report: dict[str, Any], limit: dict[str, Any] | None,
                     timings: dict[str, float], graph_files: tuple[str, ...]) -> Manifest:
    """Refuse an export whose parity is above `limit` (parity.fp32_limit or fp16_limit; None: not enforced),
    then record the parity report with the limit and what it was derived from, stage timings
    and graph sizes."""
    report["limit"] = None if limit is None else limit["relative"]
    report["limit_from"] = limit
    if limit is not None and report["relative"] > limit["relative"]:
        raise ExportError(
            f"the exported graph's logits differ from PyTorch by {report['relative']:.1e} of the largest "
            f"logit, above the {limit['relative']:.1e} an export of {limit['layers']} layers, {limit['width']} "
            f"wide, rounding with eps {limit['eps']:.1e}, must meet; nothing was written. Please report this "
            "with the backbone's name."
        )
    manifest.parity = report
    manifest.source["timings_s"] = {k: round(v, 2) for k, v in timings.items()}
    manifest.source["model_bytes"] = sum(p.stat().st_size for f in graph_files for p in folder.glob(f + "*"))
    save_manifest(folder, manifest)
    return manifest


def _export_seq2seq(loaded: Backbone, name: str, folder: Path, settings: dict[str, Any],
                    timings: dict[str, float]) -> Manifest:
    """An encoder-decoder backbone: encoder.onnx and decoder.onnx from prefixkit's own forward
    (optimum's seq2seq export has no way to feed an encoder or cross-attention prefix), checked
    against it in PyTorch."""
    import onnx

    from prefixkit.runtime.manifest import SEQ2SEQ_FILES
    from prefixkit.runtime.seq2seq import ExportedSeq2Seq

    from .seq2seq import check_parity, export_graphs

    with _stage("exporting the encoder and decoder graphs (prefixes in all three attentions)", timings, "export"):
        export_graphs(loaded.model, folder)
    inputs, outputs, opset = [], [], 0
    for file in SEQ2SEQ_FILES:
        model = onnx.load(str(folder / file))
        onnx.helper.set_model_props(model, {FINGERPRINT_METADATA: loaded.fingerprint})
        inputs += [f"{file}:{i.name}" for i in model.graph.input]
        outputs += [f"{file}:{o.name}" for o in model.graph.output]
        opset = max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
        _save_model(model, folder / file)
    beside = all((folder / (file + WEIGHTS_SUFFIX)).is_file() for file in SEQ2SEQ_FILES)
    manifest = _start_manifest(loaded, name, folder, settings,
                               graph=GraphSpec(kind="seq2seq", inputs=inputs, outputs=outputs, opset=opset,
                                               weights_beside=beside),
                               dtype="float32", quantization=None, optimization={"offline": False},
                               decoder_start_token_id=int(loaded.model.config.decoder_start_token_id))
    with _stage("checking parity with PyTorch (prefixes 10/none/3 in one batch, padded sources)", timings, "parity"):
        report = check_parity(loaded.model, ExportedSeq2Seq(folder))
        say(f"  logits within {report['max_abs']:.1e} ({report['relative']:.1e} of the largest)")
    return _finish_manifest(folder, manifest, report, fp32_limit(loaded.model.config.to_dict()), timings,
                            SEQ2SEQ_FILES)


def _quantize(model, method: str):
    """int4 or int8 weights for every MatMul with a constant weight, the output projection
    included (see quantize.py for the scheme and why); `method` int4-a16, int4-a8, ... also marks
    prefixkit's matmul nodes to round their activations (quantize.py: ACTIVATIONS)."""
    from .graph_edits import gemm_to_matmul, untie_lm_head
    from .quantize import ACCURACY_LEVEL, BLOCK, KERNEL_DOMAIN, quantize_graph

    producers = {out: node for node in model.graph.node for out in node.output}
    untied = untie_lm_head(model)
    gemms = gemm_to_matmul(model)
    lm_head = producers["logits"].name if "logits" in producers else None
    bits = 4 if method.startswith("int4") else 8
    activations = int(method.split("-a")[1]) if "-a" in method else 32
    lm_head_bits = max(bits, LM_HEAD_BITS)
    counts = quantize_graph(model, bits, bits_for={lm_head: lm_head_bits} if lm_head else None, activations=activations)
    lm_head_quantized = lm_head is not None and not any(n.name == lm_head for n in model.graph.node)
    attention_nodes = sum(n.domain == KERNEL_DOMAIN and n.op_type == "Attention" for n in model.graph.node)
    return model, {
        "method": method,
        "bits": bits,
        "lm_head_bits": lm_head_bits,
        "block_size": BLOCK,
        "scheme": "per block d*q+m; m outside MatMulNBits, or as its integer zero points where a whole number of"
                  " steps; 8-bit weights that 4 bits reproduce as well stored at 4",
        "accuracy_level": ACCURACY_LEVEL,
        "activations": f"int{activations}" if activations != 32 else "fp32",  # in prefixkit's CPU kernel
        "quantized_matmuls": counts["quantized"],
        "shared_input_groups_merged": counts["merged"],
        "narrowed_to_4_bits": counts["narrowed"],
        "float_matmuls_left": counts["left_in_float"],
        "kernel_nodes": sum(n.domain == KERNEL_DOMAIN for n in model.graph.node),
        "attention_nodes": attention_nodes,
        "lm_head_untied": untied,
        "lm_head_quantized": lm_head_quantized,
        "gemm_rewritten": gemms,
    }


def _build_fused(hf_folder: Path, out: Path) -> None:
    """Run ONNX Runtime GenAI's model builder at fp32 (quantisation is ours, afterwards) in a
    subprocess, so its output and memory stay apart from this process."""
    import subprocess
    import sys

    cmd = [
        sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf_folder), "-o", str(out),
        "-p", "fp32", "-e", "cpu", "-c", str(out.parent / "builder-cache"),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0 or not (out / MODEL_FILE).is_file():
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        raise ExportError(
            f"ONNX Runtime GenAI's model builder failed ({lines[-1] if lines else f'exit {proc.returncode}'}); "
            "export with --graph optimum instead."
        )
    shutil.rmtree(out.parent / "builder-cache", ignore_errors=True)


def _optimize_offline(path: Path, kernel_nodes: bool = False) -> dict[str, Any]:
    """Apply ONNX Runtime's provider-independent graph optimisations once and save the result,
    so every session starts from the optimised graph (sessions optimise online anyway; this
    saves start-up time). Not for a graph with prefixkit's operators where their library cannot
    be built here: ONNX Runtime would write their fallback bodies in their place for good."""
    import onnx
    import onnxruntime as ort

    from prefixkit.runtime import kernels

    from .quantize import KERNEL_DOMAIN, add_kernel_functions

    if kernel_nodes and kernels.library() is None:
        return {"offline": False, "skipped": "prefixkit's kernels cannot be built here; optimising offline would "
                                             "replace their operators by the fallback bodies in the saved graph"}

    # ONNX Runtime writes the optimised graph and its weights into a folder of their own (not over
    # the weights this session reads), moved into place once the session is gone.
    staging = path.with_name(".optimized")
    staging.mkdir()
    optimized, weights = staging / path.name, path.with_name(path.name + WEIGHTS_SUFFIX)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(optimized)
    options.add_session_config_entry("session.optimized_model_external_initializers_file_name", weights.name)
    options.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes",
                                     str(EXTERNAL_MIN_BYTES))
    # With prefixkit's kernels registered its operators stay as they are (without, ONNX Runtime
    # would write their fallback bodies in their place), and the saved graph keeps them but not
    # their definitions.
    own_kernels = kernel_nodes and kernels.register(options, ["CPUExecutionProvider"])
    kept = [f for f in onnx.load(str(path), load_external_data=False).functions if f.domain == KERNEL_DOMAIN]
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    del session
    if own_kernels:
        model = onnx.load(str(optimized), load_external_data=False)
        model.functions.extend(kept)
        add_kernel_functions(model)
        onnx.save_model(model, str(optimized))
    if not (staging / weights.name).is_file():  # no tensor large enough to go there
        weights.unlink(missing_ok=True)
    for file in staging.iterdir():
        file.replace(path.with_name(file.name))
    staging.rmdir()
    return {"offline": True, "level": "extended", "provider": "CPUExecutionProvider", "own_kernels": own_kernels}


def _save_model(model, path: Path) -> None:
    """`path` and its weights beside it (`path` + WEIGHTS_SUFFIX): ONNX Runtime maps that file
    into memory and computes from it in place, where weights inside the graph file are parsed and
    copied (smollm2-135m int4: a session loads in 0.15 instead of 0.55 s and holds 65 instead of
    406 MB until the weights are read; fp32: 0.7 instead of 1.4 s, peak 686 instead of 1078 MB)."""
    import onnx

    onnx.save_model(
        model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
        location=path.name + WEIGHTS_SUFFIX, size_threshold=EXTERNAL_MIN_BYTES,
    )


def _same_export(existing: Manifest, fingerprint: str, settings: dict[str, Any], kind: str) -> bool:
    """The same backbone and settings, asked for alike or built alike (auto resolving to the
    graph named before, or the reverse)."""
    before = existing.source.get("settings", {})
    same_rest = all(before.get(k) == settings[k] for k in ("quantize", "dtype", "optimize"))
    built = {"genai-gqa": "fused", "optimum-decoder-with-past": "optimum", "prefixkit-traced": "traced",
             "seq2seq": "seq2seq"}.get(existing.graph.kind)
    return existing.fingerprint == fingerprint and same_rest and (before.get("graph") == settings["graph"] or built == kind)


def _existing_export(out: Path) -> Manifest | None:
    if not (out / "manifest.json").is_file():
        return None
    try:
        return load_manifest(out)
    except ManifestError:
        return None


def _publish(tmp: Path, out: Path) -> None:
    """Rename the finished folder into place; an existing one (with --force) goes last."""
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{int(time.time())}")
        out.rename(old)
    tmp.rename(out)
    if old is not None and old.is_dir():
        shutil.rmtree(old, ignore_errors=True)
    elif old is not None:
        old.unlink()


def _versions() -> dict[str, str]:
    names = ["prefixkit", "torch", "transformers", "optimum", "optimum-onnx", "onnx", "onnxruntime"]
    versions = {}
    for name in names:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            versions[name] = importlib.metadata.version(name)
    return versions


@contextlib.contextmanager
def _stage(message: str, timings: dict[str, float], key: str) -> Iterator[None]:
    say(message)
    started = time.perf_counter()
    yield
    timings[key] = time.perf_counter() - started
