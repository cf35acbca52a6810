// What every command shares: argument parsing whose errors are usage errors, and the mapping of
// an error to the exit code (0 fine, 1 a check or the run failed, 2 bad usage or configuration).
import { type ParseArgsConfig, parseArgs } from "node:util";

export class UsageError extends Error {
  readonly code = "ASHMESH_USAGE";
}

/** parseArgs whose errors are UsageErrors (exit 2). */
export function parse<const T extends ParseArgsConfig>(config: T): ReturnType<typeof parseArgs<T>> {
  try {
    return parseArgs(config);
  } catch (err) {
    throw new UsageError((err as Error).message);
  }
}

/** Errors that mean "bad usage or bad configuration" (exit 2), by their stable `code`. */
const USAGE_CODES = new Set(["ASHMESH_USAGE", "ASHMESH_BAD_CONFIG", "ASHMESH_BAD_IDENTITY", "ASHMESH_CA"]);

export function exitCodeFor(err: unknown): number {
  return USAGE_CODES.has((err as { code?: string } | null)?.code ?? "") ? 2 : 1;
}
