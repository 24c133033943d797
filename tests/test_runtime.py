"""compiler.runtime.StagedRun: a model run stage by stage equals one run, reads feeds when they are read."""
import numpy as np
import onnx.parser
import pytest

from compiler.runtime import StagedRun, run_model

MODEL = """<ir_version: 8, opset_import: ["" : 13]>
g (float[2,3] x, float[3] late) => (float[2,3] y)
  <float[3] c = {1.0, 2.0, 3.0}> {
  a = Add(x, c)
  b = Relu(a)
  m = Mul(b, a)
  y = Add(m, late)
}
"""


@pytest.fixture
def model():
    return onnx.parser.parse_model(MODEL)


def sample(seed):
    return {"x": np.random.default_rng(seed).normal(size=(2, 3)).astype(np.float32)}


def test_stages_give_what_one_run_gives(model):
    late = np.array([0.5, -1.0, 2.0], np.float32)
    staged = StagedRun(model, [["a"], ["b", "a"], ["y"]])
    for seed in range(3):
        expected = run_model(model, [{**sample(seed), "late": late}], ["a", "b", "y"])[0]
        cache = dict(sample(seed))
        got = {}
        for stage in range(3):
            got.update(staged.run(stage, cache, {"late": late}))
        for name in ("a", "b", "y"):
            np.testing.assert_array_equal(got[name], expected[name])
        assert cache == {}  # nothing is kept after the last stage that reads it


def test_each_node_runs_in_the_first_stage_that_needs_it(model):
    staged = StagedRun(model, [["a"], ["b"], ["y"]])
    assert [[node.op_type for node in nodes] for nodes in staged.nodes] == [["Add"], ["Relu"], ["Mul", "Add"]]
    assert staged.reads[2] == ["a", "b", "late"]  # a and b come from the cache, late from the feeds


def test_a_feed_changed_between_stages_reaches_the_later_stage(model):
    staged = StagedRun(model, [["b"], ["y"]])
    cache = dict(sample(0))
    staged.run(0, cache, {"late": np.zeros(3, np.float32)})
    moved = np.array([1.0, 1.0, 1.0], np.float32)
    y = staged.run(1, cache, {"late": moved})["y"]
    expected = run_model(model, [{**sample(0), "late": moved}], ["y"])[0]["y"]
    np.testing.assert_array_equal(y, expected)


def test_a_node_whose_body_reads_an_earlier_tensor_runs_after_it():
    from onnx import TensorProto, helper
    branch = lambda name, op: helper.make_graph(  # noqa: E731
        [helper.make_node(op, ["a", "a"], [f"{name}_out"])], name, [],
        [helper.make_tensor_value_info(f"{name}_out", TensorProto.FLOAT, [2, 3])])
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["a"]),
         helper.make_node("ReduceSum", ["x"], ["s"], keepdims=0),
         helper.make_node("Greater", ["s", "zero"], ["positive"]),
         helper.make_node("If", ["positive"], ["y"], then_branch=branch("then", "Add"), else_branch=branch("else", "Mul"))],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])],
        [helper.make_tensor("zero", TensorProto.FLOAT, [], [0.0])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    staged = StagedRun(model, [["a"], ["y"]])
    assert "a" in staged.reads[1]  # the If's branches read 'a' from the outer graph
    cache = dict(sample(1))
    staged.run(0, cache)
    np.testing.assert_array_equal(staged.run(1, cache)["y"], run_model(model, [sample(1)], ["y"])[0]["y"])
