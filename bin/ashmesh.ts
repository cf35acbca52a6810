#!/usr/bin/env node
// The executable. Node's compile cache (22.1+) keeps the compiled code of ashmesh and its
// dependencies on disk, so that a sidecar starts in about half the time from the second start
// on; where the cache directory cannot be written, Node says so in a status and runs as before.
import module from "node:module";

module.enableCompileCache?.();
const { exitCodeFor } = await import("./args.js");
const { run } = await import("./cli.js");

run(process.argv.slice(2)).then(
  (code) => {
    process.exitCode = code;
  },
  (err: Error) => {
    process.stderr.write(`ashmesh: ${err.message}\n`);
    process.exitCode = exitCodeFor(err);
  },
);
