// The command line: dispatches argv to the module of each command (one file per command; what
// they share is in args.ts).
import { readFileSync } from "node:fs";

export const USAGE = `ashmesh — mTLS sidecar proxy for service meshes on Podman and systemd

  ashmesh proxy   [--config FILE]                run one sidecar (MTLS_*/SERVICE_* env override the file)
  ashmesh up      [--mesh FILE] [--once]         the whole mesh on this machine, no containers
  ashmesh certs   init|issue|issue-all|revoke|rotate|renew|inspect ...   the development CA
  ashmesh check   [--config FILE | --mesh FILE]  verify a sidecar's files, or every edge of a mesh
  ashmesh edges   URL... | --mesh FILE [--json]  edges seen by sidecars (admin URLs)

Run \`ashmesh <command> --help\` for a command's options.`;

export type Command = (argv: string[]) => Promise<number>;

const COMMANDS: Record<string, () => Promise<Command>> = {
  proxy: async () => (await import("./proxy.js")).main,
  up: async () => (await import("./up.js")).main,
  certs: async () => (await import("./certs.js")).main,
  check: async () => (await import("./check.js")).main,
  edges: async () => (await import("./edges.js")).main,
};

function version(): string {
  for (const candidate of ["../../package.json", "../package.json"]) {
    try {
      return (JSON.parse(readFileSync(new URL(candidate, import.meta.url), "utf8")) as { version: string }).version;
    } catch {
      // try the next layout (dist/bin or bin)
    }
  }
  return "unknown";
}

export async function run(argv: string[]): Promise<number> {
  const [name, ...rest] = argv;
  if (!name || name === "--help" || name === "-h" || name === "help") {
    process.stdout.write(`${USAGE}\n`);
    return name ? 0 : 2;
  }
  if (name === "--version" || name === "-v") {
    process.stdout.write(`ashmesh ${version()}\n`);
    return 0;
  }
  const load = COMMANDS[name];
  if (!load) {
    process.stderr.write(`ashmesh: unknown command "${name}"\n\n${USAGE}\n`);
    return 2;
  }
  return (await load())(rest);
}
