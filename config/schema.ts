// One typed schema for a sidecar's configuration, with every default in one place (DESIGN §3).
// Objects are strict: an unknown key is an error that names it, never silently ignored.
import { isIP } from "node:net";
import tls from "node:tls";
import { z } from "zod";

export interface ListenAddress {
  host: string;
  port: number;
}

const LOOPBACK_V4 = /^127\.\d{1,3}\.\d{1,3}\.\d{1,3}$/;

export function isLoopback(host: string): boolean {
  return host === "localhost" || host === "::1" || LOOPBACK_V4.test(host);
}

/** "host:port", "[v6]:port" or ":port" (all interfaces). */
export function parseHostPort(value: string): ListenAddress | null {
  const match = /^(?:\[([0-9a-fA-F:.]+)\]|([^:[\]\s]*)):(\d{1,5})$/.exec(value);
  if (!match) return null;
  const port = Number(match[3]);
  if (port > 65535) return null;
  return { host: match[1] ?? (match[2] || "0.0.0.0"), port };
}

const listen = z.string().transform((value, ctx) => {
  const parsed = parseHostPort(value);
  if (!parsed) {
    ctx.addIssue({ code: "custom", message: 'expected "host:port" with a port from 0 to 65535' });
    return z.NEVER;
  }
  return parsed;
});

// DNS names and allow-list entries: a literal name, or "*.domain" standing for exactly one label.
const DNS_LABEL = "[a-zA-Z0-9_](?:[a-zA-Z0-9_-]{0,61}[a-zA-Z0-9_])?";
const dnsName = z
  .string()
  .regex(new RegExp(`^${DNS_LABEL}(?:\\.${DNS_LABEL})*$`), "expected a DNS name such as auth.ashchan.local");
const identityPattern = z
  .string()
  .min(1)
  .refine(
    (value) => value === "*" || !value.includes("*") || /^\*\.[^*]+$/.test(value),
    'expected an identity, "*.domain" (one label) or "*"',
  );

const tlsVersion = z.enum(["TLSv1.2", "TLSv1.3"]);

const KNOWN_CIPHERS = new Set(tls.getCiphers().map((name) => name.toUpperCase()));
const cipher = z
  .string()
  .refine((name) => KNOWN_CIPHERS.has(name.toUpperCase()), "expected a cipher suite name OpenSSL knows");

const httpUrl = z
  .string()
  .refine((value) => /^http:\/\/[^/]+\/?$/.test(value) && URL.canParse(value), "expected http://host:port")
  .refine(
    (value) => !value.includes("@"),
    "expected http://host:port without credentials (they would reach the logs and /status)",
  );

const spkiPin = z
  .string()
  .regex(/^sha256\/\/?[A-Za-z0-9+/]{43}=$/, "expected sha256/<base64 SHA-256 of the SPKI>, as curl's --pinnedpubkey");

const path = z.string().regex(/^\/[^?#\s]*$/, 'expected an absolute path such as "/api/v1/verify"');

const HTTP_METHOD = /^[A-Z]+$/;

const route = z.strictObject({
  path,
  methods: z.array(z.string().regex(HTTP_METHOD, "expected an upper-case HTTP method")).min(1).optional(),
  allow: z.array(identityPattern),
});

const upstream = z.strictObject({
  listen: listen.refine((a) => isLoopback(a.host), "the outbound listener must bind to a loopback address"),
  target: z.string().refine((value) => {
    const parsed = parseHostPort(value);
    return parsed !== null && parsed.port > 0;
  }, 'expected "host:port" of the peer\'s inbound'),
  /** The identity the peer's certificate must carry; default: the target's host name. */
  identity: dnsName.optional(),
  pin: spkiPin.nullable().default(null),
});

const resolveTarget = z.string().refine((value) => {
  if (isIP(value)) return true;
  const parsed = parseHostPort(value);
  return parsed !== null && parsed.port > 0;
}, 'expected an address ("10.90.0.21") or "address:port"');

const positiveMs = z.number().int().positive();

// A TCP listener's name: its `listener` label in metrics and logs. "inbound" and "outbound" name
// the HTTP listeners in those same fields.
const tcpName = z
  .string()
  .regex(/^[a-zA-Z0-9_-]{1,64}$/, "expected a short name such as redis")
  .refine((name) => name !== "inbound" && name !== "outbound", "inbound and outbound name the HTTP listeners");

const peerTarget = z.string().refine((value) => {
  const parsed = parseHostPort(value);
  return parsed !== null && parsed.port > 0 && parsed.host !== "0.0.0.0";
}, 'expected "host:port" of a peer\'s tcp.inbound');

const tcpInbound = z.strictObject({
  name: tcpName,
  listen,
  // The server behind the tunnel: on loopback, or the bytes would cross a network in plain text
  // after the sidecar verified them (inbound.app is only warned about; a raw TCP target is refused).
  target: z.string().refine((value) => {
    const parsed = parseHostPort(value);
    return parsed !== null && parsed.port > 0 && isLoopback(parsed.host);
  }, 'expected "host:port" on loopback (127.0.0.0/8, ::1 or localhost), where only this host can reach it'),
  // Required: a raw TCP server has no per-request check of ours behind it, so "any identity the
  // mesh CA signed" must be written out ("*"), never a default. []: nobody.
  allow: z.array(identityPattern, {
    error: 'expected a list of the identities that may connect ([] for nobody, ["*"] for any the mesh CA signed)',
  }),
});

const tcpOutbound = z.strictObject({
  name: tcpName,
  listen: listen.refine((a) => isLoopback(a.host), "the outbound listener must bind to a loopback address"),
  target: peerTarget,
  /** The identity the peer's certificate must carry as an exact DNS SAN. */
  identity: z
    .string({ error: "expected the DNS name the peer's certificate must carry, such as redis.ashchan.local" })
    .pipe(dnsName),
  pin: spkiPin.nullable().default(null),
});

// ACME (RFC 8555) is spoken over HTTPS only; credentials in the URL would reach logs and /status.
const httpsUrl = z
  .string()
  .refine((value) => URL.canParse(value) && new URL(value).protocol === "https:", "expected an https:// URL")
  .refine((value) => !URL.canParse(value) || !new URL(value).username, "expected a URL without credentials");

// CRLs are signed, so a distribution point may be plain HTTP (most are); the signature is checked.
const crlUrl = z
  .string()
  .refine(
    (value) => URL.canParse(value) && ["https:", "http:"].includes(new URL(value).protocol),
    "expected an https:// (or http://) URL of a CRL",
  );

/** The keys ACME certificates are made with; ECDSA P-256 is the seed's. */
export const ACME_KEY_TYPES = ["ecdsa-p256", "ecdsa-p384", "rsa-2048", "rsa-3072"] as const;

const acme = z.strictObject({
  /** The CA's ACME directory (ACME_DIRECTORY). */
  directory: httpsUrl,
  /** PEM bundle the ACME server's HTTPS certificate must chain to (ACME_CA_BUNDLE); null: the system's roots. */
  caBundle: z.string().min(1).nullable().default(null),
  /** External account binding (ACME_EAB_KID, ACME_EAB_HMAC): step-ca, Vault and most private CAs ask for it. */
  eab: z
    .strictObject({
      kid: z.string().min(1),
      hmac: z.string().regex(/^[A-Za-z0-9_=+/-]+$/, "expected the base64url HMAC key the CA handed out"),
    })
    .nullable()
    .default(null),
  /** DNS names to request; default [service.dnsName], which must be one of them. */
  names: z.array(dnsName).min(1).optional(),
  keyType: z.enum(ACME_KEY_TYPES).default("ecdsa-p256"),
  /** The ACME account's private key; made (0600) when missing. Default: acme-account.key beside tls.key. */
  accountKey: z.string().min(1).optional(),
  email: z.email("expected an e-mail address").nullable().default(null),
  /** tls-alpn-01 is answered on the inbound listener itself; http-01 needs http01Listen. */
  challenge: z.enum(["tls-alpn-01", "http-01"]).default("tls-alpn-01"),
  /** Where http-01 is answered (the CA connects to port 80 of the name); null: no http-01 listener. */
  http01Listen: listen.nullable().default(null),
  /** Renew once this fraction of the certificate's lifetime has passed (the seed's 70 %). */
  renewAt: z.number().gt(0).lt(1).default(0.7),
  /** Backoff between failed orders: from retryMinMs, doubling, jittered, up to retryMaxMs. */
  retryMinMs: positiveMs.default(5_000),
  retryMaxMs: positiveMs.default(3_600_000),
});

export const configSchema = z.strictObject({
  service: z.strictObject({
    name: z.string().regex(/^[a-zA-Z0-9][a-zA-Z0-9._-]*$/, "expected a service name such as auth-accounts"),
    dnsName,
  }),
  tls: z
    .strictObject({
      cert: z.string().min(1).default("/etc/mtls/server.crt"),
      key: z.string().min(1).default("/etc/mtls/server.key"),
      ca: z.string().min(1).default("/etc/mtls/ca.crt"),
      clientCert: z.string().min(1).optional(),
      clientKey: z.string().min(1).optional(),
      crl: z.string().min(1).nullable().default(null),
      /** Where the CRLs are fetched from (with the CRL distribution points of our chain); written to tls.crl. */
      crlUrl: z
        .union([crlUrl, z.array(crlUrl)])
        .transform((v) => (Array.isArray(v) ? v : [v]))
        .default([]),
      /** How often the CRLs are fetched (and always when one reaches its nextUpdate). */
      crlRefreshMs: positiveMs.default(300_000),
      minVersion: tlsVersion.default("TLSv1.3"),
      ciphers: z.array(cipher).min(1).default(["TLS_AES_256_GCM_SHA384", "TLS_CHACHA20_POLY1305_SHA256"]),
    })
    .prefault({}),
  inbound: z
    .strictObject({
      enabled: z.boolean().default(true),
      listen: listen.default({ host: "0.0.0.0", port: 8443 }),
      verifyClient: z.boolean().default(true),
      app: httpUrl.default("http://127.0.0.1:9502"),
      // What the app speaks: HTTP/1.1, or HTTP/2 cleartext with prior knowledge (gRPC servers).
      appProtocol: z.enum(["http1", "h2c"]).default("http1"),
      // Absent: any identity the mesh CA signed. []: nobody.
      allow: z.array(identityPattern).optional(),
      routes: z.array(route).default([]),
    })
    .prefault({}),
  outbound: z
    .strictObject({
      enabled: z.boolean().default(true),
      listen: listen
        .refine((a) => isLoopback(a.host), "the outbound listener must bind to a loopback address")
        .nullable()
        .default({ host: "127.0.0.1", port: 15001 }),
      // Absent: "*.<the parent domain of service.dnsName>".
      destinations: z.array(identityPattern).optional(),
      port: z.number().int().min(1).max(65535).default(8443),
      resolve: z.record(dnsName, resolveTarget).default({}),
      upstreams: z.record(z.string().regex(/^[a-zA-Z0-9_-]+$/, "expected a short name"), upstream).default({}),
      // How requests reach a peer's inbound. "match": HTTP/2 and gRPC callers over one multiplexed h2
      // session per peer, HTTP/1.1 callers over pooled HTTP/1.1 connections (the lower tail latency
      // on Node); "h2": every request over the h2 session (fewest connections and handshakes).
      peerProtocol: z.enum(["match", "h2"]).default("match"),
    })
    .prefault({}),
  // Plain TCP tunnels for protocols that are not HTTP (PostgreSQL, Redis, ...), identity checked per connection.
  tcp: z
    .strictObject({
      inbound: z.array(tcpInbound, { error: "expected a list of listeners {name, listen, target, allow}" }).default([]),
      outbound: z
        .array(tcpOutbound, { error: "expected a list of listeners {name, listen, target, identity, pin?}" })
        .default([]),
    })
    .prefault({})
    .superRefine((tcp, ctx) => {
      const seen = new Set<string>();
      for (const [direction, list] of [
        ["inbound", tcp.inbound],
        ["outbound", tcp.outbound],
      ] as const) {
        for (const [i, l] of list.entries()) {
          if (seen.has(l.name)) {
            ctx.addIssue({
              code: "custom",
              path: [direction, i, "name"],
              message: "expected a name no other tcp listener has (it is the listener label)",
            });
          }
          seen.add(l.name);
        }
      }
    }),
  admin: z
    .strictObject({
      enabled: z.boolean().default(true),
      // Loopback unless told otherwise: /status and /edges describe the mesh to whoever asks.
      // Containers set ADMIN_LISTEN=0.0.0.0:9901 so that Prometheus on the network can scrape.
      listen: listen.default({ host: "127.0.0.1", port: 9901 }),
      // Names (besides IP literals, localhost, service.name, service.dnsName and the host name)
      // a request may carry in Host: anything else is refused (DNS rebinding).
      hosts: z.array(dnsName).default([]),
    })
    .prefault({}),
  // Absent or null: certificates come from files someone else writes.
  acme: acme.nullable().default(null),
  limits: z
    .strictObject({
      maxConnections: z.number().int().positive().default(4096),
      // Connections still in their TLS handshake: in all, and from one source address. Past either,
      // the oldest such connection is closed to make room (a handshake takes milliseconds).
      maxPendingHandshakes: z.number().int().positive().default(512),
      maxPendingHandshakesPerSource: z.number().int().positive().default(128),
      // New connections a second from one source address (a burst of twice as many); 0: no limit.
      handshakesPerSecondPerSource: z.number().int().min(0).default(0),
      // The whole TLS handshake, from TCP accept, must be done within this.
      handshakeTimeoutMs: positiveMs.default(5_000),
      // A request with more header lines, or a larger head, gets 431 and its connection closes.
      maxRequestHeaders: z.number().int().positive().default(100),
      maxHeaderBytes: z.number().int().min(1024).max(1_048_576).default(16_384),
      headersTimeoutMs: positiveMs.default(10_000),
      requestTimeoutMs: positiveMs.default(30_000),
      idleTimeoutMs: positiveMs.default(60_000),
      upstreamTimeoutMs: positiveMs.default(30_000),
      drainTimeoutMs: positiveMs.default(15_000),
      upstreamConnections: z.number().int().positive().default(64),
      // TCP + TLS to a peer (outbound) or TCP to the app (inbound) must be up within this.
      connectTimeoutMs: positiveMs.default(5_000),
      // An idle pooled connection to a peer or the app is closed after this (unless the server says less).
      upstreamKeepAliveMs: positiveMs.default(4_000),
      // TCP keep-alive probes on connections to peers start after this much silence.
      tcpKeepAliveMs: positiveMs.default(60_000),
      // File events within this window make one reload (a rotation writes key and cert in turn).
      reloadDebounceMs: positiveMs.default(75),
      // A reload triggered by files that fails is tried once more after this, before it counts as failed.
      reloadRetryMs: positiveMs.default(400),
    })
    .prefault({}),
  log: z
    .strictObject({
      level: z.enum(["trace", "debug", "info", "warn", "error", "fatal", "silent"]).default("info"),
    })
    .prefault({}),
  // Processes that share the listeners: 1 for a sidecar beside one service; N, or "auto" (one
  // per core), for a gateway or a load test. A primary process then keeps admin, ACME and the
  // CRL fetcher; the workers serve the connections (cluster.ts).
  workers: z.union([z.literal("auto"), z.number().int().min(1).max(64)]).default(1),
});

export type ConfigInput = z.input<typeof configSchema>;
type ParsedConfig = z.output<typeof configSchema>;

/** The configuration the sidecar runs with: every default applied, derived values filled in. */
export type Config = Omit<ParsedConfig, "tls" | "outbound" | "acme"> & {
  tls: ParsedConfig["tls"] & { clientCert: string; clientKey: string };
  outbound: ParsedConfig["outbound"] & { destinations: string[] };
  acme: AcmeConfig | null;
};

export type AcmeConfig = NonNullable<ParsedConfig["acme"]> & { names: string[]; accountKey: string };
