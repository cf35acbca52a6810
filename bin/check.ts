// `ashmesh check`, in the spirit of `linkerd check` and the seed's verify-mesh.sh: one ✔ or ×
// line per check, a hint under each ×, exit 1 when any check failed.
//   --config FILE   one sidecar's configuration and files
//   --mesh FILE     every edge of a running mesh, over the network, with the dev CA's certificates
import { readFileSync } from "node:fs";
import net from "node:net";
import tls from "node:tls";
import { DEFAULT_PKI_DIR, DevCa } from "../certs-dev/store.js";
import { ConfigError, loadConfig } from "../config/load.js";
import { edges, loadMesh, type Mesh, type MeshService } from "../config/mesh.js";
import { type Config, parseHostPort } from "../config/schema.js";
import { AcmeManager } from "../proxy/acme.js";
import { ChallengeResponder } from "../proxy/acme-challenge.js";
import { PeerConnector } from "../proxy/connector.js";
import { type Identity, identityNotices, validateIdentity } from "../proxy/identity.js";
import { createLogger } from "../proxy/log.js";
import { assertUsable, clientSecureContext, type Verified } from "../proxy/tls.js";
import { subjectAltNames } from "../proxy/x509.js";
import { parse, UsageError } from "./args.js";
import { defaultMeshFile } from "./local-mesh.js";

const HELP = `ashmesh check --config FILE [--timeout MS]
                                          check one sidecar's configuration and files (and ACME state)
ashmesh check --mesh FILE [--dir DIR] [--addresses local|dns] [--timeout MS]
                                          check every edge of a running mesh

--mesh connects to every service's inbound as each of its callers (certificates from the dev CA
in DIR, default ${DEFAULT_PKI_DIR}), checks the server's identity, that the caller is allowed, that a
service that is not a caller is refused, and that a client without a certificate is refused.
--addresses local (default) uses the mesh file's loopback addresses (\`ashmesh up\`); dns uses
the services' DNS names (inside the Podman network).

--config also checks each TCP listener: a tcp.inbound's target accepts TCP connections; a
tcp.outbound's target completes mTLS with this sidecar's client certificate and proves the
configured identity (that opens, and closes at once, one tunnel to the peer's server).`;

interface Line {
  ok: boolean;
  text: string;
  hint?: string;
}

class Report {
  readonly lines: Array<Line | { section: string }> = [];
  section(name: string): void {
    this.lines.push({ section: name });
  }
  ok(text: string): void {
    this.lines.push({ ok: true, text });
  }
  fail(text: string, hint?: string): void {
    this.lines.push({ ok: false, text, ...(hint ? { hint } : {}) });
  }
  get failed(): number {
    return this.lines.filter((l) => "ok" in l && !l.ok).length;
  }
  print(out: (s: string) => void): void {
    for (const line of this.lines) {
      if ("section" in line) out(`\n${line.section}\n${"-".repeat(line.section.length)}`);
      else out(`${line.ok ? "√" : "×"} ${line.text}${line.hint ? `\n    see: ${line.hint}` : ""}`);
    }
    const checks = this.lines.filter((l) => "ok" in l).length;
    out(
      `\n${this.failed === 0 ? "Status check results are √" : `Status check results are × (${this.failed} of ${checks} failed)`}`,
    );
  }
}

const DAY_MS = 86_400_000;

async function checkConfig(file: string, report: Report, timeoutMs: number): Promise<void> {
  report.section("configuration");
  let config: Config;
  try {
    config = loadConfig({ file, env: process.env });
    report.ok(`configuration is valid (${file})`);
  } catch (err) {
    report.fail(
      err instanceof ConfigError ? err.message.replace(/\n\s*/g, "; ") : (err as Error).message,
      "README § Configuration",
    );
    return;
  }
  if (!config.inbound.verifyClient)
    report.fail(
      "inbound.verifyClient is false: clients without a certificate are accepted",
      "set MTLS_VERIFY_CLIENT=true once every caller has a certificate",
    );
  else report.ok("inbound requires client certificates");
  if (config.tls.minVersion === "TLSv1.3") report.ok("TLS 1.3 only");
  else report.fail(`tls.minVersion is ${config.tls.minVersion}`, "the seed asks for TLS 1.3 everywhere");
  if (config.inbound.allow === undefined)
    report.fail("inbound.allow is not set: any identity the mesh CA signed may call", "list the callers (MTLS_ALLOW)");
  else report.ok(`allow-list: ${config.inbound.allow.join(", ") || "nobody"}`);
  for (const l of config.tcp.inbound) {
    const listen = `${l.listen.host}:${l.listen.port}`;
    report.ok(`tcp.inbound ${l.name}: mTLS on ${listen} → ${l.target} (loopback)`);
    if (l.allow.includes("*"))
      report.fail(
        `tcp.inbound ${l.name}: allow has "*": any identity the mesh CA signed reaches ${l.target}`,
        "list the clients: a TCP server behind the tunnel gets no per-request check from the sidecar",
      );
    else report.ok(`tcp.inbound ${l.name}: allow-list: ${l.allow.join(", ") || "nobody"}`);
  }
  for (const l of config.tcp.outbound) {
    report.ok(
      `tcp.outbound ${l.name}: ${l.listen.host}:${l.listen.port} → mTLS to ${l.target}, which must prove ${l.identity}${l.pin ? " and match the pin" : ""}`,
    );
  }

  // The sidecar's own validator and OpenSSL's verdict: exactly what `ashmesh proxy` would refuse or warn about.
  report.section("identity files");
  const { identity, findings } = await validateIdentity(config.tls, { dnsName: config.service.dnsName });
  for (const f of findings) {
    if (f.level === "ok") report.ok(f.message);
    else report.fail(`${f.field} (${f.file}): ${f.message}`, f.hint);
  }
  if (!identity) return;
  try {
    assertUsable(identity, config.tls);
    report.ok(`OpenSSL accepts the identity with ${config.tls.minVersion} and ${config.tls.ciphers.join(", ")}`);
  } catch (err) {
    report.fail((err as Error).message);
  }
  const now = new Date();
  for (const leaf of new Set([identity.server, identity.client])) {
    const s = leaf.summary;
    const days = Math.floor((s.notAfter.getTime() - now.getTime()) / DAY_MS);
    report.ok(`certificate ${s.subject} valid until ${s.notAfter.toISOString().slice(0, 10)} (${days} days)`);
  }
  for (const notice of identityNotices(identity, now, config.acme ?? undefined))
    report.fail(notice.message, notice.hint);
  if (config.tcp.inbound.length + config.tcp.outbound.length > 0) {
    report.section("tcp targets");
    await checkTcpTargets(config, identity, report, timeoutMs);
  }
}

/** A TCP connection to host:port: null when accepted, else why not. */
function tcpReachable(host: string, port: number, timeoutMs: number): Promise<string | null> {
  return new Promise((resolve) => {
    const socket = net.connect({ host, port });
    const done = (error: string | null) => {
      clearTimeout(timer);
      socket.destroy();
      resolve(error);
    };
    const timer = setTimeout(() => done(`no connection within ${timeoutMs} ms`), timeoutMs);
    socket.once("connect", () => done(null));
    socket.once("error", (err: NodeJS.ErrnoException) => done(err.code ?? err.message));
  });
}

/** Each tcp.inbound target accepts connections; each tcp.outbound target proves its identity, by the sidecar's own connector. */
async function checkTcpTargets(config: Config, identity: Identity, report: Report, timeoutMs: number): Promise<void> {
  for (const l of config.tcp.inbound) {
    const target = parseHostPort(l.target) as { host: string; port: number };
    const error = await tcpReachable(target.host, target.port, timeoutMs);
    if (error)
      report.fail(
        `tcp.inbound ${l.name}: nothing accepts connections at ${l.target} (${error})`,
        `start the server, or fix tcp.inbound ${l.name}'s target: until then every tunnel is closed at once`,
      );
    else report.ok(`tcp.inbound ${l.name}: ${l.target} accepts connections`);
  }
  const context = config.tcp.outbound.length > 0 ? clientSecureContext(identity, config.tls) : null;
  for (const l of config.tcp.outbound) {
    const target = parseHostPort(l.target) as { host: string; port: number };
    let verified: Verified | null = null;
    const connector = new PeerConnector(
      { identity: l.identity.toLowerCase(), host: target.host, port: target.port, pin: l.pin, label: l.target },
      context as tls.SecureContext,
      identity.ca.certs,
      { connected: (_socket, state) => (verified = state), failed: () => undefined },
      { connectTimeoutMs: timeoutMs, tcpKeepAliveMs: config.limits.tcpKeepAliveMs },
    );
    const error = await connector.connect([]).then(
      (socket) => {
        socket.destroy();
        return null;
      },
      (err: Error) => err,
    );
    const state = verified as Verified | null;
    if (error || !state)
      report.fail(
        `tcp.outbound ${l.name}: ${error?.message ?? "no verified connection"}`,
        `is the peer's sidecar listening on ${l.target}, with a certificate for ${l.identity}?`,
      );
    else report.ok(`tcp.outbound ${l.name}: ${l.target} proved ${l.identity} (${state.version})`);
  }
}

/** ACME: the directory answers, and what the sidecar's manager last did (acme-state.json beside tls.key). */
async function checkAcme(config: Config, report: Report): Promise<void> {
  const acme = config.acme;
  if (!acme) return;
  report.section("acme");
  const logger = createLogger({ service: config.service.name, level: "silent" });
  const manager = new AcmeManager(config, logger, new ChallengeResponder(logger, config.limits));
  try {
    const down = await manager.verifyDirectory();
    if (down) report.fail(`the ACME directory does not answer: ${down}`, "is the CA up and reachable from this host?");
    else report.ok(`ACME directory ${acme.directory} answers`);
  } catch (err) {
    report.fail((err as Error).message, "README § Certificates from step-ca, Vault or any ACME CA");
  }
  const files = await manager.inspect();
  if (files.usable)
    report.ok(
      `certificate ${files.serial} (${acme.names.join(", ")}), renewal due ${new Date(files.dueAt).toISOString()}`,
    );
  else report.fail(`the certificate files need a new order: ${files.reason}`, "the sidecar orders one at start");
  const state = AcmeManager.readState(config);
  if (!state) {
    report.fail(
      `no ACME state in ${AcmeManager.statePath(config)}: the sidecar has not ordered yet`,
      "start it: ashmesh proxy --config FILE",
    );
    return;
  }
  const last = state.last_order;
  if (last?.result === "ok") report.ok(`last order ${last.at}: ok${last.serial ? ` (serial ${last.serial})` : ""}`);
  else if (last)
    report.fail(
      `last order ${last.at} failed (${state.consecutive_failures} in a row): ${last.reason}`,
      state.next_retry ? `next attempt ${state.next_retry}; see the acme_renewal_failed log lines` : undefined,
    );
  if (state.next_renewal) {
    const overdue = Date.parse(state.next_renewal) < Date.now() && state.consecutive_failures > 0;
    if (overdue)
      report.fail(`renewal was due ${state.next_renewal} and has not succeeded yet`, "see the last error above");
    else report.ok(`next renewal ${state.next_renewal}`);
  }
}

/** Connects to host:port with optional credentials, sends one request, reads the answer head. */
function probe(
  host: string,
  port: number,
  servername: string,
  credentials: { cert: Buffer; key: Buffer } | null,
  ca: Buffer,
  timeoutMs: number,
): Promise<{
  handshake: boolean;
  serverIds: string[];
  status: number | null;
  ashmeshError: string | null;
  error: string | null;
}> {
  return new Promise((resolve) => {
    const result = {
      handshake: false,
      serverIds: [] as string[],
      status: null as number | null,
      ashmeshError: null as string | null,
      error: null as string | null,
    };
    const socket = tls.connect({ host, port, servername, ca, ...(credentials ?? {}), rejectUnauthorized: false });
    let data = "";
    const done = () => {
      clearTimeout(timer);
      const head = /^HTTP\/1\.1 (\d{3})/.exec(data);
      if (head) result.status = Number(head[1]);
      result.ashmeshError = /\r\nx-ashmesh-error: ([a-z_]+)/i.exec(data)?.[1] ?? null;
      socket.destroy();
      resolve(result);
    };
    const timer = setTimeout(() => {
      result.error ??= `no answer within ${timeoutMs} ms`;
      done();
    }, timeoutMs);
    socket.on("secureConnect", () => {
      result.handshake = true;
      if (!socket.authorized) result.error = `server certificate did not verify: ${socket.authorizationError}`;
      const cert = socket.getPeerX509Certificate();
      if (cert) {
        const { dns, uris } = subjectAltNames(cert);
        result.serverIds = [...dns, ...uris];
      }
      socket.write(
        `GET /health HTTP/1.1\r\nhost: ${servername}\r\nuser-agent: ashmesh-check\r\nconnection: close\r\n\r\n`,
      );
    });
    socket.on("data", (d: Buffer) => {
      data += d.toString("latin1");
      if (data.includes("\r\n\r\n")) done();
    });
    socket.on("error", (err: NodeJS.ErrnoException) => {
      result.error ??= err.code ?? err.message;
    });
    socket.on("close", done);
  });
}

async function checkMesh(
  mesh: Mesh,
  dir: string,
  addresses: "local" | "dns",
  timeoutMs: number,
  report: Report,
): Promise<void> {
  let ca: DevCa;
  try {
    ca = DevCa.open(dir);
  } catch (err) {
    report.fail((err as Error).message, "ashmesh certs issue-all --mesh <file>");
    return;
  }
  const trust = readFileSync(DevCa.paths(dir).trustCa);
  const creds = (s: MeshService) => {
    const f = ca.identityFiles(s.dnsName);
    return { cert: readFileSync(f.cert), key: readFileSync(f.key) };
  };
  const where = (s: MeshService) => ({ host: addresses === "local" ? s.local : s.dnsName, port: mesh.ports.mtls });
  const name = (s: MeshService) => `${s.dnsName}:${mesh.ports.mtls}`;

  report.section("edges (caller → callee over mTLS)");
  for (const { from, to } of edges(mesh)) {
    const { host, port } = where(to);
    const r = await probe(host, port, to.dnsName, creds(from), trust, timeoutMs);
    const label = `${from.key} → ${to.key}`;
    if (!r.handshake)
      report.fail(
        `${label}: no TLS handshake with ${name(to)} (${r.error ?? "closed"})`,
        `is the sidecar of ${to.key} running? ashmesh check --config on its host`,
      );
    else if (r.error && !r.serverIds.length) report.fail(`${label}: ${r.error}`);
    else if (!r.serverIds.includes(to.dnsName))
      report.fail(
        `${label}: ${name(to)} presented ${r.serverIds.join(", ") || "no identity"}, not ${to.dnsName}`,
        "the wrong certificate is mounted, or the name resolves to another service",
      );
    else if (r.error) report.fail(`${label}: ${r.error}`);
    else if (r.status === null)
      report.fail(
        `${label}: ${name(to)} closed the connection without an answer: it refused ${from.dnsName}'s certificate`,
        `see the mtls_handshake_failed lines of ${to.key}'s sidecar`,
      );
    else if (r.ashmeshError === "forbidden")
      report.fail(
        `${label}: ${to.key} answers 403 to ${from.dnsName}`,
        `add ${from.dnsName} to ${to.key}'s allow-list (MTLS_ALLOW)`,
      );
    else report.ok(`${label}: TLS with ${to.dnsName} verified, ${from.dnsName} allowed (HTTP ${r.status})`);
  }

  report.section("refusals");
  for (const s of mesh.services) {
    const { host, port } = where(s);
    const anonymous = await probe(host, port, s.dnsName, null, trust, timeoutMs);
    if (!anonymous.handshake && anonymous.error === "ECONNREFUSED")
      report.fail(`${s.key}: nothing listens on ${name(s)}`);
    else if (anonymous.status !== null)
      report.fail(
        `${s.key}: ${name(s)} answered HTTP ${anonymous.status} to a client without a certificate`,
        `the sidecar of ${s.key} does not require client certificates: set MTLS_VERIFY_CLIENT=true`,
      );
    else report.ok(`${s.key}: a client without a certificate is refused`);
    const outsiders = mesh.services.filter((o) => o.key !== s.key && !s.callers.includes(o.key));
    const outsider = outsiders[0];
    if (outsider) {
      const r = await probe(host, port, s.dnsName, creds(outsider), trust, timeoutMs);
      if (r.ashmeshError === "forbidden") report.ok(`${s.key}: ${outsider.key} (not a caller) gets 403`);
      else
        report.fail(
          `${s.key}: ${outsider.key}, not a caller, got ${r.status ?? r.error ?? "no answer"} instead of 403`,
          `check ${s.key}'s allow-list (MTLS_ALLOW)`,
        );
    }
  }
}

export async function main(argv: string[]): Promise<number> {
  const { values } = parse({
    args: argv,
    options: {
      config: { type: "string", short: "c" },
      mesh: { type: "string" },
      dir: { type: "string", default: DEFAULT_PKI_DIR },
      addresses: { type: "string", default: "local" },
      timeout: { type: "string", default: "3000" },
      help: { type: "boolean", short: "h" },
    },
    strict: true,
  });
  if (values.help) {
    process.stdout.write(`${HELP}\n`);
    return 0;
  }
  if (values.addresses !== "local" && values.addresses !== "dns")
    throw new UsageError(`--addresses=${values.addresses}: expected local or dns`);
  const timeout = Number(values.timeout);
  if (!Number.isInteger(timeout) || timeout <= 0)
    throw new UsageError(`--timeout=${values.timeout}: expected milliseconds`);
  const report = new Report();
  if (values.config) {
    await checkConfig(values.config, report, timeout);
    const config = (() => {
      try {
        return loadConfig({ file: values.config, env: process.env });
      } catch {
        return null; // reported above
      }
    })();
    if (config) await checkAcme(config, report);
  }
  if (values.mesh !== undefined || !values.config) {
    const mesh = loadMesh(values.mesh ?? defaultMeshFile());
    await checkMesh(mesh, values.dir, values.addresses, timeout, report);
  }
  report.print((s) => process.stdout.write(`${s}\n`));
  return report.failed === 0 ? 0 : 1;
}
