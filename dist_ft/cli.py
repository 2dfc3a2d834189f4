"""`dist-ft` command line. Bad input exits with status 2 and one line naming what to fix."""

from __future__ import annotations

import argparse
import os
import sys

from .errors import UserError
from .faults import Faults

EXAMPLES = """\
examples:
  dist-ft demo                       fine-tune SmolLM2-135M on the shipped demo set, score before/after
  dist-ft demo --stage dpo           then preference-tune it (DPO) to say "I don't know", score before/after
  dist-ft demo --stage grpo          online RL (GRPO): SmolLM2-135M learns to reply with only the sum
  dist-ft prepare configs/gpt2-chat.yaml --out /data/ultrachat-gpt2   tokenize + pack once into shards
  dist-ft train configs/gpt2-chat.yaml data.prepared=/data/ultrachat-gpt2
  dist-ft train configs/gpt2-chat.yaml train.lr=3e-5 data.max_seq_len=512
  deepspeed --num_gpus 2 launch/train.py configs/gpt2-chat.yaml
  dist-ft chat --model runs/demo/final                 interactive chat (/reset, /exit)
  dist-ft chat --model runs/demo/final --prompt "Hi"   answer once and exit
  dist-ft serve --model runs/demo/final --port 8000    OpenAI API: /v1/chat/completions, /v1/models
  dist-ft eval --model runs/demo/final --data data/demo/heldout.jsonl
  dist-ft eval --model runs/demo/final --harness lm-eval --tasks veloria_mc   lm-evaluation-harness, offline
  dist-ft config configs/demo.yaml train.lr=1e-4       print the resolved config (validates it)
  dist-ft config --reference                           every config key with its doc
  dist-ft doctor [CONFIG] [--json]                     versions, devices, launch, SLURM, disk, W&B
"""


def _add_gen_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=int, default=256, help="longest reply in tokens (default 256)")
    p.add_argument(
        "--temperature", type=float, default=0.7, help="sampling temperature; 0 = greedy (default 0.7)"
    )
    p.add_argument("--top-p", type=float, default=0.9, help="nucleus sampling mass (default 0.9)")


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="dist-ft",
        description="Fine-tune a Hugging Face causal LM into a chat model with DeepSpeed, from one CPU to a "
        "SLURM cluster.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = ap.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "train",
        help="train from a YAML config (+ key=value overrides); exports to <output.dir>/final",
        description="Train from a YAML config. Overrides use dotted keys: train.lr=3e-5 "
        "data.max_seq_len=512. Multi-process: run launch/train.py under deepspeed, torchrun or srun with the "
        "same arguments.",
    )
    p.add_argument("config", help="YAML config file, e.g. configs/demo.yaml")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides")

    p = sub.add_parser(
        "prepare",
        help="tokenize, pack and write token shards once (train then reads them, on any number of ranks)",
        description="Read data.train (and data.validation / val_fraction), apply the chat template and "
        "labels, pack, and write token shards + manifest. Without --out they go to the cache train looks in, "
        "so train with the same config tokenizes nothing; with --out, train with data.prepared=DIR. An "
        "interrupted prepare resumes.",
    )
    p.add_argument("config", help="YAML config file (its model and data sections are used)")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. data.num_proc=8")
    p.add_argument("--out", help="directory to write (default: the on-the-fly cache under data.cache_dir)")

    p = sub.add_parser("chat", help="chat with an exported model")
    p.add_argument(
        "--model",
        required=True,
        help="exported model directory (<output.dir>/final), or the base model with --adapter",
    )
    p.add_argument(
        "--adapter", help="a PEFT adapter directory to apply to --model (e.g. <output.dir>/final/adapter)"
    )
    p.add_argument("--prompt", help="answer this one message and exit (for scripts)")
    p.add_argument("--system", help="optional system message")
    p.add_argument(
        "--trust-remote-code", action="store_true", help="allow custom model code (off by default)"
    )
    _add_gen_args(p)

    p = sub.add_parser(
        "serve",
        help="OpenAI-compatible HTTP server (/v1/chat/completions, /v1/completions, /v1/models)",
        description="Serve an exported model with the OpenAI API (streaming included). Binds to localhost "
        "unless told otherwise; with --api-key (or $DIST_FT_API_KEY) every request needs "
        "'Authorization: Bearer KEY'.",
    )
    p.add_argument(
        "--model",
        required=True,
        help="exported model directory (<output.dir>/final), or the base model with --adapter",
    )
    p.add_argument("--adapter", help="a PEFT adapter directory to apply to --model")
    p.add_argument(
        "--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)"
    )
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument(
        "--api-key",
        default=os.environ.get("DIST_FT_API_KEY"),
        help="require this bearer token (default: $DIST_FT_API_KEY; none: open)",
    )
    p.add_argument("--name", help="the model id clients send (default: --model as given)")
    p.add_argument(
        "--max-queue",
        type=int,
        default=16,
        help="requests running or waiting before new ones get 503 (default 16)",
    )
    p.add_argument(
        "--max-body-mb",
        type=float,
        default=8.0,
        help="largest request body in MB; larger ones get 413 (default 8)",
    )

    p = sub.add_parser(
        "eval",
        help="held-out loss/perplexity (+ answer accuracy for records with a 'check' field); "
        "a classifier: accuracy and macro-F1; a reward model: pairwise accuracy",
    )
    p.add_argument("--model", required=True, help="exported model directory")
    p.add_argument(
        "--data",
        help="JSONL/JSON/Parquet file: conversations, {text, label} records (classifier) "
        "or preference pairs (reward model)",
    )
    p.add_argument(
        "--harness",
        choices=("lm-eval",),
        help="run EleutherAI lm-evaluation-harness on --model instead (offline)",
    )
    p.add_argument("--tasks", help="--harness: comma-separated task names (shipped: veloria_mc)")
    p.add_argument("--include", help="--harness: a directory of your own lm-eval task YAMLs")
    p.add_argument("--limit", type=int, help="--harness: at most this many samples per task")

    p = sub.add_parser(
        "demo",
        help="the offline demo: score, fine-tune, score again, chat once "
        "(--stage dpo: then preference-tune it; --stage grpo: online RL with a verifiable reward)",
    )
    p.add_argument(
        "--stage",
        choices=("sft", "dpo", "grpo"),
        default="sft",
        help="sft: fine-tune SmolLM2-135M on the demo facts (default); "
        "dpo: preference-tune that result to answer honestly (run the sft stage first); "
        "grpo: GRPO on SmolLM2-135M-Instruct, rewarded for replying with only the right sum",
    )
    p.add_argument(
        "--config", help="demo config (default configs/demo.yaml, configs/demo-<stage>.yaml with --stage)"
    )
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides")

    p = sub.add_parser("config", help="validate and print a resolved config, or the reference of all keys")
    p.add_argument("config", nargs="?", help="YAML config file")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    p.add_argument(
        "--reference", action="store_true", help="print every key, type, default and doc as Markdown"
    )

    p = sub.add_parser(
        "doctor",
        help="versions, devices, the launch as dist-ft reads it, SLURM, disk and W&B: what a bug report "
        "needs and what will go wrong before a long job",
    )
    p.add_argument(
        "config", nargs="?", help="YAML config file (adds its output.dir and cache to the disk check)"
    )
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    return ap


def _prepare(args, faults: Faults) -> None:
    from pathlib import Path

    from . import tasks
    from .config import load_config
    from .data import shards
    from .model import preflight
    from .tokenizer import load_tokenizer

    cfg = load_config(args.config, args.overrides)
    if cfg.data.train is None:
        raise UserError(f"{args.config}: dist-ft prepare needs data.train (the source to tokenize)")
    if args.out and Path(args.out).expanduser().resolve() in (Path.cwd(), *Path.cwd().parents):
        raise UserError(
            f"prepare --out '{args.out}': that is the current directory (or holds it), and the shards would "
            "be mixed into it; give a new directory, e.g. --out data/prepared"
        )
    preflight(cfg.model, cfg.data.max_seq_len)
    tok = load_tokenizer(cfg.model)
    if cfg.data.mixture:  # each source on its own: <out>/<role>-<name>/ (or its cache entry), mixture.json
        from .data import mixture

        plan = mixture.parts(cfg.data)
        base = Path(args.out).expanduser() if args.out else None
        counts = []
        for part in plan:
            where = base / part.dirname if base else shards.cache_entry(part.cfg, tok)
            m = shards.prepare(part.cfg, tok, where, tasks.get(part.cfg.task), faults=faults)
            _print_splits(m, f"{part.role} source {part.name!r} ")
            counts.append({split: info.stats.to_json() for split, info in m.splits.items()})
        if base is not None:
            mixture.write_plan(base, plan, counts)
        out = base or cfg.data.cache_path() / "shards"
        print(f"wrote {out} (a mixture of {len(plan)} sources)")
    else:
        out = Path(args.out).expanduser() if args.out else shards.cache_entry(cfg.data, tok)
        manifest = shards.prepare(cfg.data, tok, out, tasks.get(cfg.data.task), faults=faults)
        _print_splits(manifest, "")
        print(f"wrote {out} ({manifest.dtype}, {manifest.tokens_per_s:,} tokens/s)")
    print(
        f"train on it: dist-ft train {args.config} {' '.join(args.overrides)}"
        + (f" data.prepared={out}" if args.out else "   (same config: found in the cache)")
    )


def _print_splits(manifest, what: str) -> None:
    for split, info in manifest.splits.items():
        st = info.stats
        print(
            f"{what}{split}: {st.records:,} records, {st.examples:,} examples, {st.tokens:,} tokens "
            f"({st.loss_tokens:,} loss-bearing), {len(info.shards)} shard(s)"
        )


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        # the test suite's fault injection (every rank runs this): none unless DIST_FT_TEST_* set
        faults = Faults.from_env(os.environ)
        if args.cmd == "train":
            from . import train
            from .config import load_config
            from .model import preflight

            cfg = load_config(args.config, args.overrides)
            # config.json, context length, attention kernel: before any rank waits on another
            preflight(cfg.model, cfg.data.max_seq_len)
            train.run(cfg, faults=faults)
        elif args.cmd == "prepare":
            _prepare(args, faults)
        elif args.cmd == "chat":
            from . import chat, inference

            tok, model = inference.load(args.model, args.trust_remote_code, args.adapter)
            gen = dict(
                max_new_tokens=args.max_new_tokens,
                temperature=args.temperature,
                top_p=args.top_p,
                faults=faults,
            )
            if args.prompt is not None:
                history = ([{"role": "system", "content": args.system}] if args.system else []) + [
                    {"role": "user", "content": args.prompt}
                ]
                chat.answer_streamed(tok, model, history, **gen)
            else:
                chat.interactive(tok, model, args.system, **gen)
        elif args.cmd == "serve":
            from .serve import serve

            serve(
                args.model,
                args.adapter,
                args.host,
                args.port,
                args.api_key,
                args.name,
                args.max_queue,
                args.max_body_mb,
                faults,
            )
        elif args.cmd == "eval":
            from . import evaluate, inference

            if args.harness:
                from . import harness

                if not args.tasks:
                    raise UserError("dist-ft eval --harness lm-eval: give --tasks, e.g. --tasks veloria_mc")
                print(harness.table(harness.run(args.model, args.tasks.split(","), args.include, args.limit)))
                return 0
            if not args.data:
                raise UserError("dist-ft eval: give --data FILE (or --harness lm-eval --tasks ...)")
            tok, model = inference.load(args.model)
            if inference.is_sequence_head(args.model):
                print(
                    evaluate.fmt_heads(
                        evaluate.score_heads(tok, model, args.data), model.config.num_labels == 1
                    )
                )
            elif evaluate.has_answers(args.data):  # {prompt, answer}: greedy replies checked
                print(evaluate.fmt_answers(evaluate.score_answers(tok, model, args.data)))
            else:
                print(evaluate.fmt_score(evaluate.score(tok, model, args.data)))
        elif args.cmd == "demo":
            from . import demo

            demo.run(args.config, args.overrides, args.stage)
        elif args.cmd == "config":
            from .config import dump_config, load_config
            from .config_reference import reference_markdown

            if args.reference:
                print(reference_markdown(), end="")
            elif args.config:
                print(dump_config(load_config(args.config, args.overrides)), end="")
            else:
                raise UserError("dist-ft config: give a config file or --reference")
        elif args.cmd == "doctor":
            from . import doctor

            doctor.main(args.config, args.overrides, args.json)
    except UserError as e:
        from .redact import scrub

        # whatever the message quotes (a URL, a library's error): no secret
        print(f"error: {scrub(str(e))}", file=sys.stderr)
        _leave_group(e.exit_code)
        return e.exit_code
    return 0


def _leave_group(code: int) -> None:
    """Every rank of a multi-process run failed on the same bad input. Ranks > 0 leave at once, skipping
    interpreter teardown (with rank 0's store gone, a process group torn down late can abort: the launcher
    then reports 250, SIGABRT, instead of the error's exit code); rank 0, whose store the others use, leaves
    last."""
    if "torch.distributed" not in sys.modules:
        return
    import signal
    import time

    import torch.distributed as tdist

    if tdist.is_available() and tdist.is_initialized() and tdist.get_world_size() > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        if tdist.get_rank() != 0:
            os._exit(code)
        # the launcher may SIGTERM this rank once another exited: it is leaving with the error's code anyway
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        time.sleep(1.0)


def entry() -> None:
    sys.exit(main())
