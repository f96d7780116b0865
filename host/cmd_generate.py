"""`ndpmoe generate`: text from a model whose every MoE layer runs through the runtime (expert
store on disk, expert cache, restoration policy, placement, plans, executor with the NDP on the
golden model or the simulated RTL), with the measured time per token and its split."""
from __future__ import annotations

import json
import sys
from pathlib import Path

NDP_MODES = ("none", "golden", "rtl")
PLACEMENT_NAMES = ("auto", "all-gpu", "all-ndp", "ndp-gemm", "ndp-comp")   # host/placement.py checks them


def add_arguments(p):
    p.add_argument("--model", default="default", help="'default' (the MoEfied SmolLM2, built offline) or a local "
                   "Hugging Face MoE checkpoint folder / Qwen-MoE .gguf file")
    p.add_argument("--layers", default=None, help="comma list of MoE layers to run through the runtime (default: all; "
                   "on the default model the others stay dense, a reduced build)")
    p.add_argument("--prompt", required=True, help="text to continue")
    p.add_argument("--max-new-tokens", type=int, default=32, help="tokens to generate (greedy)")
    p.add_argument("--bits", type=int, default=3, help="low-bit expert width (2, 3, 4, 8)")
    p.add_argument("--rank", type=int, default=16, help="stored compensator rank (policies use prefixes of it)")
    p.add_argument("--hi-bits", type=int, default=8, help="higher-precision expert copies (0: none)")
    p.add_argument("--policy", default="none", help="restoration policy: none, top-N, random-N, hobbit, budgeted:BYTES, gain-budget:BYTES "
                   "(measured gains; measures the store's gain tables once)")
    p.add_argument("--placement", default="auto", help=f"one of {', '.join(PLACEMENT_NAMES)}")
    p.add_argument("--ndp", default="golden", choices=NDP_MODES, help="none: GPU-only system; golden: the bit-exact "
                   "NDP model; rtl: also the first --rtl-tokens tokens on the Verilator-simulated unit")
    p.add_argument("--ndp-config", default="default", help="NDP configuration (model/contract.py CONFIGS)")
    p.add_argument("--cache-mb", type=float, default=4.0, help="GPU expert cache capacity, MB (10^6 bytes)")
    p.add_argument("--eviction", default="lru", help="expert cache policy: lru or lfu")
    p.add_argument("--device", default="cpu", help="cpu, cuda or auto (the CUDA path has not run on hardware yet)")
    p.add_argument("--rtl-tokens", type=int, default=4, help="with --ndp rtl: tokens whose NDP work runs on the RTL")
    p.add_argument("--rtl-stalls", default="none", choices=("none", "random"),
                   help="with --ndp rtl: random stalls on the unit's memory and output handshakes")
    p.add_argument("--factors", default="fp16", help="compensator precision: fp16 (GPU; int8 on the NDP) or int8, "
                   "int4, int3 (packed low-bit factors both units read)")
    p.add_argument("--calib-tokens", type=int, default=4096, help="calibration tokens of the expert store's fits")
    p.add_argument("--no-eos", action="store_true", help="do not stop at the end-of-text token")
    p.add_argument("--prefetch", default="auto", choices=("auto", "on", "off"),
                   help="next-layer expert prefetch: guess layer l+1's experts with its router on layer l's input "
                   "and stage their fetches on a side stream; auto: on with CUDA, off on the CPU (where it only "
                   "moves host work earlier)")
    p.add_argument("--json", help="write the figures here")


def _layers(spec: str | None):
    if spec is None:
        return None
    try:
        return tuple(int(v) for v in spec.split(",") if v.strip())
    except ValueError:
        raise ValueError(f"--layers must be comma-separated integers, not {spec!r}") from None


def run(args) -> int:
    from .generate import GenerateOptions, ModelSpec
    from .generate_report import format_report

    opts = GenerateOptions(prompt=args.prompt, max_new_tokens=args.max_new_tokens,
                           model=ModelSpec(args.model, _layers(args.layers)), bits=args.bits, rank=args.rank,
                           hi_bits=args.hi_bits, policy=args.policy, placement=args.placement, ndp=args.ndp,
                           ndp_config=args.ndp_config, cache_mb=args.cache_mb, eviction=args.eviction,
                           device=args.device, rtl_tokens=args.rtl_tokens, calib_tokens=args.calib_tokens,
                           stop_at_eos=not args.no_eos, factors=args.factors, prefetch=args.prefetch)
    opts.check()                                  # bad arguments fail before anything loads
    log = lambda s: print(s, file=sys.stderr, flush=True)
    emit = lambda s: print(s, end="", flush=True)
    try:
        log(f"loading {opts.model.describe()} ...")
        first = [True]

        def on_text(piece: str) -> None:
            if first[0]:
                print(opts.prompt, end="", flush=True)
                first[0] = False
            emit(piece)

        if opts.ndp == "rtl":
            from ndpmoe.sim.generate_rtl import format_rtl, generate_rtl, rtl_ok

            result = generate_rtl(opts, on_text=on_text, log=log, stalls=args.rtl_stalls)
        else:
            from .generate import generate

            result = generate(opts, on_text=on_text, log=log)
    except KeyboardInterrupt:
        print("\nndpmoe generate: interrupted before decoding began (no store was left half-written)", file=sys.stderr)
        return 130
    print("\n")
    print(format_report(result))
    ok = result.link_equal()
    if opts.ndp == "rtl":
        print()
        print(format_rtl(result.extra["rtl"], result.ndp_clock_mhz))
        rtl = result.extra["rtl"]
        ok = ok and ("skipped" in rtl or rtl_ok(rtl))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result.to_json(), indent=1, default=str))
        print(f"\nwrote {args.json}")
    if result.interrupted:
        print(f"\nndpmoe generate: {result.interrupted}", file=sys.stderr)
        return 130
    return 0 if ok else 1
