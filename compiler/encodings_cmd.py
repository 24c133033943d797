"""``qcc encodings check QDQ.onnx FILE.encodings``: does the file describe the model (compiler.encodings_check)?
Exit 0 when it does, 1 with one line per problem."""
from __future__ import annotations

import sys

from compiler.arguments import add_input_shape, input_shapes
from compiler.encoding import HTP_ARCHS

EXIT_PROBLEMS = 1


def add_command(sub) -> None:
    p = sub.add_parser("encodings", help="work with encodings files (AIMET/QNN JSON)")
    actions = p.add_subparsers(dest="action", required=True, parser_class=type(p))
    check = actions.add_parser("check", help="check an encodings file against the QDQ model it describes")
    check.add_argument("model", metavar="QDQ.onnx")
    check.add_argument("encodings", metavar="FILE.encodings")
    check.add_argument("--htp-arch", choices=tuple(HTP_ARCHS),
                       help="also check the weights' widths against this HTP generation (default: the model's)")
    add_input_shape(check)
    check.set_defaults(func=cmd_check)


def cmd_check(args) -> int:
    from compiler.config import CONFIG_NAME
    from compiler.encodings_check import check_encodings
    from compiler.export import read_encodings
    from compiler.ir import load
    from compiler.pass_manager import parse_pipeline
    module = load(args.model, input_shapes(args.input_shape))
    activations, params = read_encodings(args.encodings)
    arch = args.htp_arch
    recorded = module.metadata.get("qcc.pipeline", "")
    if arch is None and recorded.startswith(CONFIG_NAME + "{"):
        arch = parse_pipeline(recorded).config.htp_arch
    problems = check_encodings(module, activations, params, arch)
    for problem in problems:
        print(f"{args.encodings}: {problem}")
    if problems:
        return EXIT_PROBLEMS
    print(f"{args.encodings}: describes {args.model}: {len(activations)} activation(s), {len(params)} parameter(s)",
          file=sys.stderr)
    return 0

