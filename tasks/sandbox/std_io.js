// Offline stand-in for https://deno.land/std@0.186.0/io/mod.ts, which DSPy's
// runner.js imports for `readLines` only. The sandbox has no network, so the
// import map points that URL here.

/**
 * Yield the lines of `reader` (a Deno.Reader such as Deno.stdin) without the
 * trailing "\n" or "\r\n". Only the newly read chunk is searched for a newline,
 * so one very long line (a large injected variable) stays linear in its size.
 */
export async function* readLines(reader) {
  const decoder = new TextDecoder();
  const chunk = new Uint8Array(64 * 1024);
  let pending = [];
  while (true) {
    const n = await reader.read(chunk);
    if (n === null) break;
    const text = decoder.decode(chunk.subarray(0, n), { stream: true });
    let start = 0;
    let index;
    while ((index = text.indexOf("\n", start)) >= 0) {
      pending.push(text.slice(start, index));
      let line = pending.join("");
      pending = [];
      if (line.endsWith("\r")) line = line.slice(0, -1);
      yield line;
      start = index + 1;
    }
    if (start < text.length) pending.push(text.slice(start));
  }
  pending.push(decoder.decode());
  const rest = pending.join("");
  if (rest.length > 0) yield rest;
}
