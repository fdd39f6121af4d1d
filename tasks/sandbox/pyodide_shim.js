// Wraps Pyodide's loadPyodide for DSPy's runner.js (mapped in by the import map).
//
// 1. When sandbox code calls a Deno API that the permissions deny (for example
//    `js.Deno.env.get("HOME")`), Python sees a JsException whose args hold a JS
//    object. runner.js then json.dumps those args, which throws outside its
//    try/catch and ends the Deno process: a denied call would kill the sandbox
//    instead of coming back to the model as an error. Turning the args into
//    strings keeps it an ordinary, recoverable code error.
// 2. Python's raw stdout and stderr (`sys.__stdout__`, `os.write(1, ...)`) go to
//    Deno's stderr, which the host drains: stdout carries the JSON-RPC protocol
//    only, so code cannot flood it with lines the host must skip.
import pyodideModule from "flagship:pyodide";

const SANITIZE_PY = `
def _flagship_sanitize_last_exc():
    import json, sys
    exc = getattr(sys, "last_exc", None)
    if exc is None:
        return
    try:
        json.dumps(exc.args)
    except Exception:
        sys.last_exc = RuntimeError(*(str(arg) for arg in exc.args))
`;

const toStderr = { write: (buffer) => Deno.stderr.writeSync(buffer), isatty: false };

async function loadPyodide(options) {
  const pyodide = await pyodideModule.loadPyodide(options);
  pyodide.setStdout(toStderr);
  pyodide.setStderr(toStderr);
  const namespace = pyodide.globals.get("dict")();
  pyodide.runPython(SANITIZE_PY, { globals: namespace });
  const sanitize = namespace.get("_flagship_sanitize_last_exc");
  const runPythonAsync = pyodide.runPythonAsync.bind(pyodide);
  pyodide.runPythonAsync = async (code, options) => {
    try {
      return await runPythonAsync(code, options);
    } catch (error) {
      try {
        sanitize();
      } catch {
        // keep the original error
      }
      throw error;
    }
  };
  return pyodide;
}

export default { ...pyodideModule, loadPyodide };
