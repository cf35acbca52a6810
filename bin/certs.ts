// `ashmesh certs ...`: the development CA (certs-dev/). For production, bring certificates from
// your own CA (Vault, step-ca, cert-manager): the sidecar only reads files.
import { begin, finish, nextStep, PHASES, type Phase, rollPhase, switchCa } from "../certs-dev/ca-roll.js";
import { inspect } from "../certs-dev/inspect.js";
import { issueAll } from "../certs-dev/issue-all.js";
import { withLock } from "../certs-dev/lock.js";
import { DEFAULT_THRESHOLD, renew } from "../certs-dev/renew.js";
import { DEFAULT_PKI_DIR, DevCa, type IssuedRecord } from "../certs-dev/store.js";
import { loadMesh } from "../config/mesh.js";
import { parse, UsageError } from "./args.js";

const HELP = `ashmesh certs <verb> [options]        (every verb takes --dir DIR, default ${DEFAULT_PKI_DIR})

  init      [--rsa] [--days N] [--cn NAME]       a new root CA (ECDSA P-256, 10 years), empty CRL
  issue     NAME [--dns D,...] [--ip A,...] [--uri U,...] [--days N] [--rsa]
                                                 a service certificate (NAME = its DNS name)
  issue-all --mesh FILE [--days N]               a certificate for every service of a mesh file;
                                                 makes the CA if missing, keeps current certificates
  rotate    NAME [--days N] [--rsa]              a new key and certificate for NAME, same SANs and
                                                 lifetime; the old one is superseded, not revoked
  rotate    ca --phase begin|switch|finish [--days N]
                                                 roll the CA without a failed request: run the phases
                                                 in order, waiting for every sidecar in between
  renew     [--threshold 0.7] [--watch] [--interval SECONDS] [--runs N]
                                                 reissue certificates past 70 % of their lifetime and
                                                 re-sign CRLs past half of their window; --watch
                                                 repeats every interval (3600) until SIGTERM/SIGINT
  revoke    NAME|SERIAL                          revoke (a serial in any case, with colons, as openssl
                                                 prints it) and write new CRLs to trust/ca.crl
  inspect   FILE [--ca BUNDLE] [--crl FILE]      a certificate, chain, CA bundle or CRL (PEM or DER) in
                                                 words; --ca checks the chain, --crl revocation
                                                 (exit 1 when a check fails)

Files: DIR/ca (CA keys, index: keep private), DIR/trust (ca.crt, ca.crl: mount in every sidecar),
DIR/NAME/server.crt and server.key (one service's identity).`;

export type Say = (line: string) => void;

const list = (value: string | undefined): string[] =>
  value
    ? value
        .split(",")
        .map((s) => s.trim())
        .filter(Boolean)
    : [];

function days(value: string | undefined): number | undefined {
  if (value === undefined) return undefined;
  const n = Number(value);
  if (!Number.isInteger(n) || n <= 0 || n > 36500)
    throw new UsageError(`--days=${value}: expected a whole number of days from 1 to 36500`);
  return n;
}

function number(flag: string, value: string | undefined, fallback: number, min: number, max: number): number {
  if (value === undefined) return fallback;
  const n = Number(value);
  if (value.trim() === "" || !Number.isFinite(n) || n < min || n > max)
    throw new UsageError(`${flag}=${value}: expected a number from ${min} to ${max}`);
  return n;
}

function one(positionals: string[], message: string): string {
  const [first] = positionals;
  if (!first || positionals.length > 1) throw new UsageError(message);
  return first;
}

function describe(r: IssuedRecord): string {
  return `${r.name}  serial ${r.serial}  valid until ${r.notAfter.slice(0, 10)}  SANs ${[...r.dns.map((d) => `DNS:${d}`), ...r.ip.map((i) => `IP:${i}`), ...r.uri.map((u) => `URI:${u}`)].join(", ")}`;
}

/**
 * Runs `once` now and then every `intervalMs` until SIGTERM or SIGINT (or `runs` runs). A failed
 * run is reported and the next one tried: a daemon that renews must outlive one bad hour.
 */
async function repeat(once: () => Promise<void>, intervalMs: number, runs: number, say: Say): Promise<number> {
  let stop: string | null = null;
  let wake = () => {};
  const onSignal = (signal: NodeJS.Signals) => {
    stop = signal;
    wake();
  };
  process.on("SIGTERM", onSignal);
  process.on("SIGINT", onSignal);
  let code = 0;
  try {
    for (let run = 1; run <= runs && !stop; run++) {
      try {
        await once();
        code = 0;
      } catch (err) {
        code = 1;
        process.stderr.write(`ashmesh: ${(err as Error).message}\n`);
      }
      if (run === runs || stop) break;
      await new Promise<void>((resolve) => {
        const timer = setTimeout(resolve, intervalMs);
        wake = () => {
          clearTimeout(timer);
          resolve();
        };
      });
    }
  } finally {
    process.off("SIGTERM", onSignal);
    process.off("SIGINT", onSignal);
  }
  if (stop) say(`${new Date().toISOString()} ${stop}: stopped`);
  return code;
}

export async function main(argv: string[], say: Say = (line) => process.stdout.write(`${line}\n`)): Promise<number> {
  const [verb, ...rest] = argv;
  const { values, positionals } = parse({
    args: rest,
    allowPositionals: true,
    options: {
      dir: { type: "string", default: DEFAULT_PKI_DIR },
      rsa: { type: "boolean", default: false },
      days: { type: "string" },
      cn: { type: "string" },
      dns: { type: "string" },
      ip: { type: "string" },
      uri: { type: "string" },
      mesh: { type: "string" },
      phase: { type: "string" },
      threshold: { type: "string" },
      watch: { type: "boolean", default: false },
      interval: { type: "string" },
      runs: { type: "string" },
      ca: { type: "string" },
      crl: { type: "string" },
      help: { type: "boolean", short: "h" },
    },
  });
  if (!verb || verb === "--help" || verb === "-h" || values.help) {
    say(HELP);
    return verb ? 0 : 2;
  }
  const dir = values.dir as string;
  switch (verb) {
    case "init": {
      const ca = await DevCa.init(dir, {
        algorithm: values.rsa ? "rsa" : "ecdsa",
        days: days(values.days) ?? 3650,
        ...(values.cn ? { commonName: values.cn } : {}),
      });
      const p = DevCa.paths(dir);
      const record = ca.active;
      say(
        `created CA ${record.subject} (serial ${record.serial}, valid until ${record.notAfter.slice(0, 10)})\n` +
          `  private: ${p.caKey} (0600), ${p.index}\n  trust:   ${p.trustCa}, ${p.trustCrl}`,
      );
      return 0;
    }
    case "issue": {
      const name = one(positionals, "certs issue takes one NAME, e.g. `ashmesh certs issue auth.ashchan.local`");
      return withLock(dir, async () => {
        const ca = DevCa.open(dir);
        const record = await ca.issue(name, {
          dns: list(values.dns),
          ip: list(values.ip),
          uri: list(values.uri),
          days: days(values.days) ?? 365,
          algorithm: values.rsa ? "rsa" : "ecdsa",
        });
        const files = ca.identityFiles(name);
        say(`issued ${describe(record)}\n  ${files.cert}\n  ${files.key} (0600)`);
        return 0;
      });
    }
    case "issue-all": {
      if (!values.mesh || positionals.length > 0)
        throw new UsageError(
          "certs issue-all takes --mesh FILE, e.g. `ashmesh certs issue-all --mesh compose/mesh.yaml`",
        );
      const mesh = loadMesh(values.mesh);
      const lifetime = days(values.days);
      return withLock(dir, async () => {
        await issueAll(mesh, dir, lifetime ? { days: lifetime } : {}, say);
        return 0;
      });
    }
    case "rotate": {
      const name = one(positionals, "certs rotate takes one NAME (or `ca --phase begin|switch|finish`)");
      if (name === "ca") return rotateCa(dir, values.phase, days(values.days), say);
      if (values.phase !== undefined) throw new UsageError("--phase belongs to `ashmesh certs rotate ca` only");
      const lifetime = days(values.days);
      return withLock(dir, async () => {
        const ca = DevCa.open(dir);
        const { previous, record } = await ca.rotate(name, {
          ...(lifetime ? { days: lifetime } : {}),
          ...(values.rsa ? { algorithm: "rsa" as const } : {}),
        });
        const files = ca.identityFiles(name);
        say(
          `rotated ${describe(record)}\n  replaced serial ${previous.serial} in ${files.cert} and ${files.key} (0600);` +
            ` sidecars watching them reload within a second.\n  The old certificate stays valid until ${previous.notAfter.slice(0, 10)};` +
            ` if its key leaked, also run \`ashmesh certs revoke ${previous.serial} --dir ${dir}\`.`,
        );
        return 0;
      });
    }
    case "renew": {
      if (positionals.length > 0) throw new UsageError("certs renew takes no NAME: it renews whatever is due");
      const threshold = number("--threshold", values.threshold, DEFAULT_THRESHOLD, 0, 1);
      if (!values.watch && (values.interval !== undefined || values.runs !== undefined))
        throw new UsageError("--interval and --runs go with --watch");
      // In --watch mode the lines go to a log: each carries its time.
      const line: Say = values.watch ? (text) => say(`${new Date().toISOString()} ${text}`) : say;
      const once = () => withLock(dir, () => renew(DevCa.open(dir), { threshold }, line));
      if (!values.watch) {
        await once();
        return 0;
      }
      const interval = number("--interval", values.interval, 3600, 1, 86_400);
      const runs = number("--runs", values.runs, Number.MAX_SAFE_INTEGER, 1, Number.MAX_SAFE_INTEGER);
      if (!Number.isInteger(runs)) throw new UsageError(`--runs=${values.runs}: expected a whole number`);
      return repeat(once, interval * 1000, runs, say);
    }
    case "revoke": {
      const target = one(positionals, "certs revoke takes one NAME or SERIAL");
      return withLock(dir, async () => {
        const ca = DevCa.open(dir);
        const revoked = await ca.revoke(target);
        const trusted = new Set(ca.trustedCas().map((c) => c.serial));
        for (const r of revoked) {
          say(`revoked ${describe(r)}`);
          if (!trusted.has(r.caSerial)) say(`  (its CA ${r.caSerial} is retired: no sidecar trusts it anyway)`);
        }
        say(`wrote ${DevCa.paths(dir).trustCrl}: sidecars watching it refuse these within a second`);
        return 0;
      });
    }
    case "inspect": {
      const file = one(positionals, "certs inspect takes one FILE (a certificate, chain, CA bundle or CRL)");
      const result = await inspect(file, {
        ...(values.ca ? { ca: values.ca } : {}),
        ...(values.crl ? { crl: values.crl } : {}),
      });
      for (const line of result.lines) say(line);
      return result.ok ? 0 : 1;
    }
    default:
      throw new UsageError(`unknown certs verb "${verb}"\n\n${HELP}`);
  }
}

async function rotateCa(dir: string, phase: string | undefined, lifetime: number | undefined, say: Say) {
  if (!PHASES.includes(phase as Phase)) {
    let where = "";
    try {
      where = `\n${nextStep(dir, rollPhase(DevCa.open(dir).cas))}`;
    } catch {
      // no CA to tell about: the usage alone
    }
    throw new UsageError(`certs rotate ca takes --phase begin, switch or finish, in that order${where}`);
  }
  return withLock(dir, async () => {
    const ca = DevCa.open(dir);
    if (phase === "begin") await begin(ca, lifetime ? { days: lifetime } : {}, say);
    else if (phase === "switch") await switchCa(ca, say);
    else await finish(ca, say);
    return 0;
  });
}
