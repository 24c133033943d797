"""The chain matcher and graph helpers passes rely on."""
import networkx as nx
import onnx.parser

from compiler.ir import from_onnx, infer_shapes, parse_input_shape
from compiler.patterns import Op, bypass, match_chain, to_networkx

TEXT = """
<ir_version: 8, opset_import: ["" : 13]>
g (float[1,2,4,4] x) => (float[1,2,4,4] y, float[1,2,4,4] z) <float[2,2,1,1] w = {1,0,0,1}> {
  a = Conv(x, w)
  b = Relu(a)
  c = Conv(b, w)
  d = Relu(c)
  e = Sigmoid(c)
  y = Add(d, e)
  f = Conv(y, w)
  z = Relu(f)
}
"""


def module():
    return from_onnx(infer_shapes(onnx.parser.parse_model(TEXT)))


def outputs_of(run):
    return [n.outputs[0].name for n in run]


def test_chain_requires_single_consumer_by_default():
    graph = module().graph
    runs = [outputs_of(r) for r in match_chain(graph, ["Conv", "Relu"])]
    # c feeds Relu and Sigmoid, so Conv(c)->Relu is not a fusable chain; a graph-output Relu still matches.
    assert runs == [["a", "b"], ["f", "z"]]
    relaxed = [outputs_of(r) for r in match_chain(graph, ["Conv", "Relu"], single_consumer=False)]
    assert relaxed == [["a", "b"], ["c", "d"], ["f", "z"]]


def test_chain_predicate_and_input_index():
    graph = module().graph
    first_conv = Op("Conv", where=lambda n: n.inputs[0].name == "x")
    assert [outputs_of(r) for r in match_chain(graph, [first_conv, "Relu", "Conv"])] == [["a", "b", "c"]]
    assert list(match_chain(graph, ["Relu", Op("Add", input_index=1)], single_consumer=False)) == []
    assert [outputs_of(r) for r in match_chain(graph, ["Sigmoid", Op("Add", input_index=1)])] == [["e", "y"]]


def test_networkx_view_gives_ancestry():
    graph = module().graph
    dag = to_networkx(graph)
    assert nx.is_directed_acyclic_graph(dag)
    index = {n.outputs[0].name: i for i, n in enumerate(graph.nodes)}
    assert index["a"] in nx.ancestors(dag, index["y"])
    assert index["z"] not in nx.ancestors(dag, index["y"])


def test_bypass_keeps_graph_output_names():
    m = module()
    graph = m.graph
    relu = next(n for n in graph.nodes if n.outputs[0].name == "z")
    assert bypass(graph, relu)
    graph.cleanup()
    assert [t.name for t in graph.outputs] == ["y", "z"]
    assert graph.outputs[1].inputs[0].op == "Conv"


def test_input_shape_names_may_contain_colons():
    assert parse_input_shape("input:0:1,3,224,224") == ("input:0", [1, 3, 224, 224])
