"""Can TF Serving run this SavedModel? A static check of every op in the export.

TF Serving runs graphs, not Python: an op that calls back into Python (`tf.py_function`,
`tf.numpy_function`) cannot run there, and an op from a library that is not linked into
the server (a custom op) fails to load. `serving_op_report` reads `saved_model.pb`, walks
every node of every meta graph and of every function in its library (the bodies of
`tf.while_loop` and `tf.cond`, and the functions those call, are library functions too)
and sorts the op types into:

  stock             registered by a process that imports only `tensorflow`
  tensorflow_text   registered only once `tensorflow_text` is imported; TF Serving's
                    standard builds link these ops in, minimal custom builds may not
  unregistered      registered by neither: the export will not load in TF Serving
  py_func           PyFunc / PyFuncStateless / EagerPyFunc: Python callbacks

Which ops are registered is decided in a child process: the stock set while it has imported
only `tensorflow` (neither this project nor tensorflow_text, which registers extra ops on
import), the tensorflow-text set after it imports tensorflow_text.

    python -m seq2seq.serving_check saved_models/translation/1
"""

import argparse
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

PY_FUNC_OPS = frozenset({"PyFunc", "PyFuncStateless", "EagerPyFunc"})

# Runs in a child process. Reads op names (JSON) on stdin; decides which are registered by a
# Python that has imported only `tensorflow`; then, only if some are not, imports
# tensorflow_text and asks again for those. Prints JSON.
_REGISTRY_SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    names = json.load(sys.stdin)
    import tensorflow
    from tensorflow.python.framework import op_def_registry
    modules = sorted({name.split(".")[0] for name in sys.modules})
    stock = sorted(name for name in names if op_def_registry.get(name) is not None)
    text = []
    rest = sorted(set(names) - set(stock))
    if rest:
        import tensorflow_text
        text = [name for name in rest if op_def_registry.get(name) is not None]
    print(json.dumps({"stock": stock, "tensorflow_text": text, "modules_at_stock_check": modules}))
    """
)


class ServingCheckError(RuntimeError):
    """The SavedModel cannot be read, or the checking subprocess failed."""


def read_saved_model(saved_model_dir):
    """The SavedModel protocol buffer of `saved_model_dir` (saved_model.pb or .pbtxt)."""
    from google.protobuf import text_format
    from tensorflow.core.protobuf import saved_model_pb2

    directory = Path(saved_model_dir)
    saved_model = saved_model_pb2.SavedModel()
    if (directory / "saved_model.pb").is_file():
        saved_model.ParseFromString((directory / "saved_model.pb").read_bytes())
    elif (directory / "saved_model.pbtxt").is_file():
        text_format.Parse((directory / "saved_model.pbtxt").read_text(), saved_model)
    else:
        raise ServingCheckError(f"{directory}: no saved_model.pb or saved_model.pbtxt")
    return saved_model


def graph_nodes(saved_model):
    """(where, node) for every node of every meta graph and of every library function.

    `where` is "graph" for the main graph, else the function name. Every function a node
    refers to (while/cond bodies, PartitionedCall targets, gradients) is in the library,
    so walking the library covers nested functions at any depth.
    """
    for meta_graph in saved_model.meta_graphs:
        graph = meta_graph.graph_def
        for node in graph.node:
            yield "graph", node
        for function in graph.library.function:
            for node in function.node_def:
                yield function.signature.name, node


def classify_ops(names):
    """(stock, tensorflow_text) subsets of op `names`, decided in a fresh Python (see module doc)."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    # -I: isolated mode; neither the working directory nor PYTHON* variables put this project on sys.path.
    completed = subprocess.run(
        [sys.executable, "-I", "-c", _REGISTRY_SCRIPT], input=json.dumps(sorted(names)), capture_output=True,
        text=True, env=env, timeout=300,
    )
    if completed.returncode != 0:
        last_line = (completed.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise ServingCheckError(f"the op registry check failed: {last_line}")
    result = json.loads(completed.stdout.strip().splitlines()[-1])
    for module in ("seq2seq", "tensorflow_text"):
        if module in result["modules_at_stock_check"]:
            raise ServingCheckError(f"importing tensorflow imported {module}; the stock op check would be wrong")
    return set(result["stock"]), set(result["tensorflow_text"])


def serving_op_report(saved_model_dir):
    """Which ops `saved_model_dir` uses and whether stock TF Serving can run them.

    Returns a dict:
      saved_model          the directory
      op_types             sorted op types of all nodes (main graph and every function)
      functions            number of library functions walked
      py_func_ops          [{"op", "node", "function"}] of every PyFunc/EagerPyFunc node
      tensorflow_text_ops  sorted ops registered only by tensorflow_text
                           (the export needs a TF Serving build with tensorflow-text ops)
      unregistered_ops     sorted ops neither stock TF nor tensorflow_text registers
      stock_tf_serving     True when every op is stock TF and no PyFunc is present
      ok                   True when no PyFunc and no unregistered op is present
    """
    saved_model = read_saved_model(saved_model_dir)
    op_types = set()
    py_funcs = []
    functions = set()
    for where, node in graph_nodes(saved_model):
        op_types.add(node.op)
        if where != "graph":
            functions.add(where)
        if node.op in PY_FUNC_OPS:
            py_funcs.append({"op": node.op, "node": node.name, "function": where})
    stock, text_ops = classify_ops(op_types)
    not_stock = op_types - stock
    unregistered = not_stock - text_ops
    return {
        "saved_model": str(saved_model_dir),
        "op_types": sorted(op_types),
        "functions": len(functions),
        "py_func_ops": py_funcs,
        "tensorflow_text_ops": sorted(text_ops),
        "unregistered_ops": sorted(unregistered),
        "stock_tf_serving": not py_funcs and not not_stock,
        "ok": not py_funcs and not unregistered,
    }


def format_report(report):
    lines = [
        f"{report['saved_model']}: {len(report['op_types'])} op types in the graph and "
        f"{report['functions']} functions",
    ]
    if report["py_func_ops"]:
        lines.append("PROBLEM: Python callbacks, which TF Serving cannot run:")
        lines += [f"  {p['op']} {p['node']} in {p['function']}" for p in report["py_func_ops"]]
    if report["unregistered_ops"]:
        lines.append("PROBLEM: ops registered neither by stock TensorFlow nor by tensorflow-text:")
        lines.append("  " + ", ".join(report["unregistered_ops"]))
    if report["tensorflow_text_ops"]:
        lines.append("needs tensorflow-text build of TF Serving (standard builds include it): "
                     + ", ".join(report["tensorflow_text_ops"]))
    if report["stock_tf_serving"]:
        lines.append("OK: only stock TensorFlow ops, no Python callbacks")
    elif report["ok"]:
        lines.append("OK: stock TensorFlow and tensorflow-text ops, no Python callbacks")
    return "\n".join(lines)


def main(argv=None):
    """The seq2seq-serving-check command, with TensorFlow's native log lines kept off stderr
    (its subprocesses write theirs into pipes this command reads)."""
    from seq2seq.cli import USER_TF_LOG_LEVEL
    from seq2seq.quiet import native_logs_filtered

    with native_logs_filtered(USER_TF_LOG_LEVEL is None):
        return _main(argv)


def _main(argv):
    parser = argparse.ArgumentParser(
        prog="python -m seq2seq.serving_check",
        description="Check that a SavedModel holds no Python callbacks and only ops TF Serving registers. "
        "Exit code 0: servable; 1: problems found; 2: the check could not run.",
    )
    parser.add_argument("saved_model_dir", help="a SavedModel directory (the version folder, e.g. model/1)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--stock-only", action="store_true",
                        help="count tensorflow-text ops as problems too (for TF Serving builds without them)")
    parser.add_argument("--list-ops", action="store_true", help="also list every op type")
    args = parser.parse_args(argv)
    try:
        report = serving_op_report(args.saved_model_dir)
    except (ServingCheckError, OSError, subprocess.TimeoutExpired) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except Exception as error:  # a corrupt saved_model.pb raises protobuf's DecodeError
        print(f"error: {args.saved_model_dir}: cannot read the SavedModel ({type(error).__name__}: {error})", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(format_report(report))
        if args.list_ops:
            print("ops: " + ", ".join(report["op_types"]))
    servable = report["stock_tf_serving"] if args.stock_only else report["ok"]
    return 0 if servable else 1


if __name__ == "__main__":
    sys.exit(main())
