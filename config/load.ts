// Reads a sidecar's configuration from a YAML/JSON file and the seed's environment variables,
// which override the file. The environment is a parameter, so tests never touch process.env.
import { readFileSync } from "node:fs";
import { dirname, isAbsolute, join, resolve } from "node:path";
import { parse as parseYaml } from "yaml";
import type { z } from "zod";
import { type Config, configSchema, parseHostPort } from "./schema.js";

export type Env = Record<string, string | undefined>;

/** A configuration that cannot be used; the CLI maps it to exit code 2. */
export class ConfigError extends Error {
  readonly code = "ASHMESH_BAD_CONFIG";
  constructor(message: string) {
    super(message);
    this.name = "ConfigError";
  }
}

type Setter = (raw: Record<string, unknown>, value: string) => void;

interface EnvVar {
  field: string;
  set: Setter;
  /** What the variable takes, when the schema's wording for the field would mislead. */
  expected?: string;
  /** Lists: set but empty means the empty list (nobody), not "unset". */
  emptyIsValue?: boolean;
  /** A secret: an error names the variable but never shows its value. */
  secret?: boolean;
}

function at(raw: Record<string, unknown>, section: string): Record<string, unknown> {
  const existing = raw[section];
  if (existing && typeof existing === "object" && !Array.isArray(existing)) return existing as Record<string, unknown>;
  const created: Record<string, unknown> = {};
  raw[section] = created;
  return created;
}

const put =
  (section: string, key: string, convert: (value: string) => unknown = (v) => v): Setter =>
  (raw, value) => {
    at(raw, section)[key] = convert(value);
  };

function bool(value: string): unknown {
  const v = value.trim().toLowerCase();
  if (["true", "1", "yes", "on"].includes(v)) return true;
  if (["false", "0", "no", "off"].includes(v)) return false;
  return value; // left as a string: the schema names the variable and says a boolean is expected
}

function eab(raw: Record<string, unknown>): Record<string, unknown> {
  const section = at(raw, "acme");
  if (!section.eab || typeof section.eab !== "object") section.eab = {};
  return section.eab as Record<string, unknown>;
}

/** Fields whose value never appears in an error message. */
const SECRET_FIELDS = new Set(["acme.eab.hmac"]);

const list = (value: string): string[] =>
  value
    .split(/[,\s]+/)
    .map((s) => s.trim())
    .filter(Boolean);

/**
 * A list or map of objects in YAML flow style or JSON, as the file would have it: the TCP listeners
 * and upstreams of a container set by environment only. Unparseable text is left as a string for
 * the schema to refuse.
 */
function yamlValue(value: string): unknown {
  try {
    return parseYaml(value);
  } catch {
    return value;
  }
}

/** Every variable of the seed's "Service Configuration", plus a few of ours (documented in README). */
export const ENV_VARS: Record<string, EnvVar> = {
  SERVICE_NAME: { field: "service.name", set: put("service", "name") },
  SERVICE_DNS_NAME: { field: "service.dnsName", set: put("service", "dnsName") },
  MTLS_ENABLED: { field: "inbound.enabled", set: put("inbound", "enabled", bool) },
  MTLS_PORT: {
    field: "inbound.listen",
    set: (raw, value) => {
      const inbound = at(raw, "inbound");
      const current = typeof inbound.listen === "string" ? parseHostPort(inbound.listen) : null;
      const host = current?.host ?? "0.0.0.0";
      inbound.listen = /^\d{1,5}$/.test(value.trim())
        ? `${host.includes(":") ? `[${host}]` : host}:${value.trim()}`
        : value;
    },
    expected: "expected a port number from 1 to 65535",
  },
  MTLS_CERT_FILE: { field: "tls.cert", set: put("tls", "cert") },
  MTLS_KEY_FILE: { field: "tls.key", set: put("tls", "key") },
  MTLS_CA_FILE: { field: "tls.ca", set: put("tls", "ca") },
  MTLS_CLIENT_CERT_FILE: { field: "tls.clientCert", set: put("tls", "clientCert") },
  MTLS_CLIENT_KEY_FILE: { field: "tls.clientKey", set: put("tls", "clientKey") },
  MTLS_CRL_FILE: { field: "tls.crl", set: put("tls", "crl", (v) => v || null) },
  MTLS_VERIFY_CLIENT: { field: "inbound.verifyClient", set: put("inbound", "verifyClient", bool) },
  MTLS_MIN_TLS_VERSION: { field: "tls.minVersion", set: put("tls", "minVersion") },
  MTLS_CIPHERS: { field: "tls.ciphers", set: put("tls", "ciphers", list) },
  MTLS_ALLOW: { field: "inbound.allow", set: put("inbound", "allow", list), emptyIsValue: true },
  APP_URL: { field: "inbound.app", set: put("inbound", "app") },
  APP_PROTOCOL: { field: "inbound.appProtocol", set: put("inbound", "appProtocol", (v) => v.trim().toLowerCase()) },
  OUTBOUND_ENABLED: { field: "outbound.enabled", set: put("outbound", "enabled", bool) },
  OUTBOUND_LISTEN: { field: "outbound.listen", set: put("outbound", "listen", (v) => v || null) },
  OUTBOUND_DESTINATIONS: {
    field: "outbound.destinations",
    set: put("outbound", "destinations", list),
    emptyIsValue: true,
  },
  OUTBOUND_PEER_PROTOCOL: {
    field: "outbound.peerProtocol",
    set: put("outbound", "peerProtocol", (v) => v.trim().toLowerCase()),
  },
  OUTBOUND_UPSTREAMS: { field: "outbound.upstreams", set: put("outbound", "upstreams", yamlValue) },
  TCP_INBOUND: { field: "tcp.inbound", set: put("tcp", "inbound", yamlValue) },
  TCP_OUTBOUND: { field: "tcp.outbound", set: put("tcp", "outbound", yamlValue) },
  ADMIN_LISTEN: { field: "admin.listen", set: put("admin", "listen") },
  MTLS_CRL_URL: { field: "tls.crlUrl", set: put("tls", "crlUrl", list) },
  // ACME: setting ACME_DIRECTORY turns the section on; the others refine it.
  ACME_DIRECTORY: { field: "acme.directory", set: put("acme", "directory") },
  ACME_CA_BUNDLE: { field: "acme.caBundle", set: put("acme", "caBundle") },
  ACME_EAB_KID: {
    field: "acme.eab.kid",
    set: (raw, value) => {
      eab(raw).kid = value;
    },
  },
  ACME_EAB_HMAC: {
    field: "acme.eab.hmac",
    set: (raw, value) => {
      eab(raw).hmac = value;
    },
    secret: true,
  },
  LOG_LEVEL: { field: "log.level", set: put("log", "level", (v) => v.trim().toLowerCase()) },
  ASHMESH_WORKERS: {
    field: "workers",
    set: (raw, value) => {
      const v = value.trim().toLowerCase();
      raw.workers = /^\d+$/.test(v) ? Number(v) : v;
    },
    expected: 'expected "auto" or a number of processes from 1 to 64',
  },
};

const FILE_FIELDS = ["cert", "key", "ca", "clientCert", "clientKey", "crl"] as const;
const ACME_FILE_FIELDS = ["caBundle", "accountKey"] as const;

function valueAt(input: unknown, path: readonly PropertyKey[]): unknown {
  let current = input;
  for (const key of path) {
    if (current === null || typeof current !== "object") return undefined;
    current = (current as Record<PropertyKey, unknown>)[key];
  }
  return current;
}

function describe(value: unknown): string {
  if (value === undefined) return "missing";
  const text = JSON.stringify(value);
  return text.length > 80 ? `${text.slice(0, 77)}...` : text;
}

function formatIssues(
  error: z.ZodError,
  input: unknown,
  fromEnv: Map<string, { field: string; value: string }>,
): string[] {
  return error.issues.map((issue) => {
    const field = issue.path.join(".");
    if (issue.code === "unrecognized_keys") {
      const where = field ? `${field}.` : "";
      return `unknown key ${issue.keys.map((k) => `"${where}${k}"`).join(", ")}: remove it or check its spelling`;
    }
    const value = valueAt(input, issue.path);
    // A value that came from the environment is named by its variable, the way the user set it.
    const [envName, envValue] =
      [...fromEnv].find(([, v]) => field === v.field || field.startsWith(`${v.field}.`)) ?? [];
    const subject = envName ? `${envName} (${field})` : field || "the configuration";
    const expected = (envName && ENV_VARS[envName]?.expected) || issue.message;
    if (value === undefined) return `${subject} is required: ${expected}`;
    if (SECRET_FIELDS.has(field) || (envName && ENV_VARS[envName]?.secret))
      return `${subject} (secret, not shown) is not valid: ${expected}`;
    return `${subject}=${describe(envValue ? envValue.value : value)} is not valid: ${expected}`;
  });
}

/** Validates a raw configuration object, the environment applied on top. */
export function parseConfig(input: unknown, options: { env?: Env; source?: string; baseDir?: string } = {}): Config {
  const source = options.source ?? "configuration";
  if (input !== undefined && input !== null && (typeof input !== "object" || Array.isArray(input))) {
    throw new ConfigError(`${source}: expected a mapping of sections (service, tls, inbound, ...)`);
  }
  const raw = structuredClone((input ?? {}) as Record<string, unknown>);

  // Paths in a file are relative to that file; paths from the environment to the working directory.
  if (options.baseDir) {
    for (const [name, keys] of [
      ["tls", FILE_FIELDS],
      ["acme", ACME_FILE_FIELDS],
    ] as const) {
      const section = raw[name];
      if (!section || typeof section !== "object") continue;
      const s = section as Record<string, unknown>;
      for (const key of keys) {
        const value = s[key];
        if (typeof value === "string" && value && !isAbsolute(value)) s[key] = resolve(options.baseDir, value);
      }
    }
  }

  const fromEnv = new Map<string, { field: string; value: string }>();
  for (const [name, variable] of Object.entries(ENV_VARS)) {
    const value = options.env?.[name];
    if (value === undefined || (value === "" && !variable.emptyIsValue)) continue;
    variable.set(raw, value);
    fromEnv.set(name, { field: variable.field, value });
  }

  const result = configSchema.safeParse(raw);
  if (!result.success) {
    const lines = formatIssues(result.error, raw, fromEnv);
    throw new ConfigError(`${source}:\n  ${lines.join("\n  ")}`);
  }
  const parsed = result.data;
  const parentDomain = parsed.service.dnsName.split(".").slice(1).join(".");
  const config: Config = {
    ...parsed,
    tls: {
      ...parsed.tls,
      clientCert: parsed.tls.clientCert ?? parsed.tls.cert,
      clientKey: parsed.tls.clientKey ?? parsed.tls.key,
    },
    outbound: {
      ...parsed.outbound,
      destinations: parsed.outbound.destinations ?? (parentDomain ? [`*.${parentDomain}`] : []),
    },
    acme: parsed.acme
      ? {
          ...parsed.acme,
          names: (parsed.acme.names ?? [parsed.service.dnsName]).map((n) => n.toLowerCase()),
          accountKey: parsed.acme.accountKey ?? join(dirname(parsed.tls.key), "acme-account.key"),
        }
      : null,
  };
  config.outbound.resolve = Object.fromEntries(
    Object.entries(config.outbound.resolve).map(([name, address]) => [name.toLowerCase(), address]),
  );
  for (const [name, spec] of Object.entries(config.outbound.upstreams)) {
    const targetHost = (parseHostPort(spec.target)?.host ?? "").toLowerCase();
    const identity = spec.identity?.toLowerCase();
    if (identity && identity !== targetHost && config.outbound.resolve[identity] !== undefined) {
      throw new ConfigError(
        `${source}:\n  outbound.resolve.${identity} and outbound.upstreams.${name} disagree: the upstream connects to its target ${spec.target}, and resolve rewrites only the address of the host connected to (as curl --resolve does), never the identity a server must prove; remove the resolve entry or set the target to ${identity}`,
      );
    }
  }
  checkAcme(config, source);
  if (config.tls.crlUrl.length > 0 && !config.tls.crl) {
    throw new ConfigError(
      `${source}:\n  tls.crlUrl is set but tls.crl is not: the fetched CRLs are written to tls.crl (MTLS_CRL_FILE), which the sidecar then loads; set it`,
    );
  }
  if (config.tls.minVersion === "TLSv1.2" && config.tls.ciphers.every((c) => c.startsWith("TLS_"))) {
    throw new ConfigError(
      `${source}:\n  tls.ciphers=${describe(config.tls.ciphers)} is not valid: tls.minVersion is TLSv1.2 but every cipher is a TLS 1.3 suite; add TLS 1.2 suites such as ECDHE-ECDSA-AES256-GCM-SHA384`,
    );
  }
  return config;
}

/** What the acme section needs of the rest of the configuration. */
function checkAcme(config: Config, source: string): void {
  const acme = config.acme;
  if (!acme) return;
  const problems: string[] = [];
  if (!acme.names.includes(config.service.dnsName.toLowerCase()))
    problems.push(
      `acme.names=${describe(acme.names)} is not valid: it must include service.dnsName ${config.service.dnsName}, the identity peers expect`,
    );
  if (acme.challenge === "tls-alpn-01" && !config.inbound.enabled)
    problems.push(
      'acme.challenge="tls-alpn-01" is not valid: it is answered on the inbound listener, which is disabled (inbound.enabled: false); use http-01 with acme.http01Listen',
    );
  if (acme.challenge === "http-01" && !acme.http01Listen)
    problems.push(
      'acme.challenge="http-01" is not valid: set acme.http01Listen (the CA connects to port 80 of the name)',
    );
  if (acme.retryMinMs > acme.retryMaxMs)
    problems.push(`acme.retryMinMs=${acme.retryMinMs} is not valid: it is above acme.retryMaxMs (${acme.retryMaxMs})`);
  if (config.tls.clientCert !== config.tls.cert || config.tls.clientKey !== config.tls.key)
    problems.push(
      "tls.clientCert/tls.clientKey are set apart from tls.cert/tls.key: with acme, the one certificate the CA issues serves both directions; remove them",
    );
  if (problems.length) throw new ConfigError(`${source}:\n  ${problems.join("\n  ")}`);
}

/** Reads FILE (YAML or JSON) when given, then applies the environment. */
export function loadConfig(options: { file?: string; env?: Env }): Config {
  let input: unknown = {};
  let source = "environment";
  let baseDir: string | undefined;
  if (options.file) {
    source = options.file;
    baseDir = dirname(resolve(options.file));
    let text: string;
    try {
      text = readFileSync(options.file, "utf8");
    } catch (err) {
      const reason = (err as NodeJS.ErrnoException).code === "ENOENT" ? "no such file" : (err as Error).message;
      throw new ConfigError(`${options.file}: cannot read the configuration file: ${reason}`);
    }
    try {
      input = parseYaml(text, { prettyErrors: true, uniqueKeys: true });
    } catch (err) {
      throw new ConfigError(`${options.file}: not valid YAML or JSON: ${(err as Error).message.split("\n")[0]}`);
    }
  }
  return parseConfig(input, { env: options.env ?? {}, source, ...(baseDir ? { baseDir } : {}) });
}
