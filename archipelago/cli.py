"""The `archipelago` console script: one entry point whose subcommands call each package's `main`.

Each package parses its own arguments; this module only picks the package and turns a
`ConfigError` (or any other user-facing `ValueError` subclass a package raises for bad input)
into a one-line error and exit status 2.

An island process (`island run`) that returns leaves at once, once its output is flushed: it has
closed its client, written its report and joined its threads, and tearing down the interpreter
(torch's modules) would hold the host for about another second doing nothing; a restarted or
finished island frees its accelerators that much sooner. Only when run as the console script (not
when a test calls `main` with its arguments), and not after an error.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys

# subcommand -> (module, help)
COMMANDS: dict[str, tuple[str, str]] = {
    "data": ("island.data.cli", "prepare the tokenizer and token shards of a corpus"),
    "train": ("island.train_cli", "train a model locally (one process)"),
    "island": ("island.run_cli", "write a run's initial model (init) or run one island (run)"),
    "coordinator": ("coordinator.cli", "run the coordinator (serve) or query it (status)"),
    "bench": ("sim.bench", "benchmarks: codec, kernels, coordinator (ratios against a same-run baseline)"),
    "sim": ("sim.cli", "simulate a multi-region run on this machine, against a data-parallel baseline"),
    "chaos": ("sim.chaos", "fault injection in a simulated run: a rank inside an island (island-ci); "
                           "coordinator, links, islands (ci)"),
    "posttrain": ("sim.posttrain", "post-training on islands through the coordinator: sft, dpo, grpo, pipeline"),
    "export": ("serving.cli", "export a checkpoint as a Hugging Face model folder (bf16/fp32, FP8, gate)"),
    "serve": ("serving.serve", "serve an exported model folder with vLLM (OpenAI-compatible API)"),
    "generate": ("serving.generate", "continue a prompt with an exported model on our own sampler"),
}


def usage() -> str:
    width = max(len(name) for name in COMMANDS)
    lines = ["usage: archipelago COMMAND [ARGS...]", "", "commands:"]
    lines += [f"  {name:<{width}}  {text}" for name, (_, text) in COMMANDS.items()]
    lines += ["", "Run 'archipelago COMMAND --help' for a command's options."]
    return "\n".join(lines)


FAST_EXIT = (("island", "run"),)  # commands that leave without the interpreter's teardown


def leave(code: int) -> None:
    """Flush what the process wrote (stdio, log handlers) and end it now, with `code`."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


def main(argv: list[str] | None = None) -> int:
    as_script = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    if argv[0] in ("-V", "--version"):
        import archipelago

        print(f"archipelago {archipelago.__version__}")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"archipelago: unknown command '{name}'\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    from archipelago.errors import UserError

    try:
        code = int(module.main(rest) or 0)
        if as_script and tuple(argv[:2]) in FAST_EXIT:
            leave(code)
        return code
    except UserError as exc:
        print(f"archipelago {name}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
