// `ashmesh certs ...`: the development CA (certs-dev/). For production, bring certificates from
// your own CA (Vault, step-ca, cert-manager): the sidecar only reads files.
import { DEFAULT_PKI_DIR, DevCa, type IssuedRecord } from "../certs-dev/store.js";
import { parse, UsageError } from "./cli.js";

const HELP = `ashmesh certs <verb> [options]        (default --dir ${DEFAULT_PKI_DIR})

  init   [--rsa] [--days N] [--cn NAME]          a new root CA (ECDSA P-256, 10 years), empty CRL
  issue  NAME [--dns D,...] [--ip A,...] [--uri U,...] [--days N] [--rsa]
                                                 a service certificate (NAME = its DNS name)
  revoke NAME|SERIAL                             revoke, and write a new CRL to trust/ca.crl

Files: DIR/ca (CA key, index: keep private), DIR/trust (ca.crt, ca.crl: mount in every sidecar),
DIR/NAME/server.crt and server.key (one service's identity).`;

const list = (value: string | undefined): string[] =>
  value
    ? value
        .split(",")
        .map((s) => s.trim())
        .filter(Boolean)
    : [];

function days(value: string | undefined, fallback: number): number {
  if (value === undefined) return fallback;
  const n = Number(value);
  if (!Number.isInteger(n) || n <= 0 || n > 36500)
    throw new UsageError(`--days=${value}: expected a whole number of days from 1 to 36500`);
  return n;
}

function describe(r: IssuedRecord): string {
  return `${r.name}  serial ${r.serial}  valid until ${r.notAfter.slice(0, 10)}  SANs ${[...r.dns.map((d) => `DNS:${d}`), ...r.ip.map((i) => `IP:${i}`), ...r.uri.map((u) => `URI:${u}`)].join(", ")}`;
}

export async function main(argv: string[]): Promise<number> {
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
      help: { type: "boolean", short: "h" },
    },
  });
  if (!verb || verb === "--help" || verb === "-h" || values.help) {
    process.stdout.write(`${HELP}\n`);
    return verb ? 0 : 2;
  }
  const dir = values.dir as string;
  const algorithm = values.rsa ? "rsa" : "ecdsa";
  switch (verb) {
    case "init": {
      const ca = await DevCa.init(dir, {
        algorithm,
        days: days(values.days, 3650),
        ...(values.cn ? { commonName: values.cn } : {}),
      });
      const p = DevCa.paths(dir);
      const record = ca.cas[0];
      process.stdout.write(
        `created CA ${record?.subject} (serial ${record?.serial}, valid until ${record?.notAfter.slice(0, 10)})\n` +
          `  private: ${p.caKey} (0600), ${p.index}\n  trust:   ${p.trustCa}, ${p.trustCrl}\n`,
      );
      return 0;
    }
    case "issue": {
      const [name] = positionals;
      if (!name || positionals.length > 1)
        throw new UsageError("certs issue takes one NAME, e.g. `ashmesh certs issue auth.ashchan.local`");
      const ca = DevCa.open(dir);
      const record = await ca.issue(name, {
        dns: list(values.dns),
        ip: list(values.ip),
        uri: list(values.uri),
        days: days(values.days, 365),
        algorithm,
      });
      const files = ca.identityFiles(name);
      process.stdout.write(`issued ${describe(record)}\n  ${files.cert}\n  ${files.key} (0600)\n`);
      return 0;
    }
    case "revoke": {
      const [target] = positionals;
      if (!target || positionals.length > 1) throw new UsageError("certs revoke takes one NAME or SERIAL");
      const ca = DevCa.open(dir);
      const revoked = await ca.revoke(target);
      for (const r of revoked) process.stdout.write(`revoked ${describe(r)}\n`);
      process.stdout.write(`wrote ${DevCa.paths(dir).trustCrl}: sidecars watching it refuse these within a second\n`);
      return 0;
    }
    default:
      throw new UsageError(`unknown certs verb "${verb}"\n\n${HELP}`);
  }
}
