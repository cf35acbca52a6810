#!/usr/bin/env node
import { exitCodeFor } from "./args.js";
import { run } from "./cli.js";

run(process.argv.slice(2)).then(
  (code) => {
    process.exitCode = code;
  },
  (err: Error) => {
    process.stderr.write(`ashmesh: ${err.message}\n`);
    process.exitCode = exitCodeFor(err);
  },
);
