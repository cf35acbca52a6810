// A real ACME CA for the tests: Let's Encrypt's Pebble (Debian's `pebble` 2.4), with its
// companion pebble-challtestsrv as the DNS server it resolves names with (on loopback), or the
// hosts file of a network namespace (`ip netns exec`). Its HTTPS listener gets a certificate of
// an "infrastructure" CA made here, which is the ACME_CA_BUNDLE of the sidecars.
// Pebble regenerates its root and intermediate at every start and hands them (and their keys)
// out on its management API; Pebble 2.4 publishes no CRL, so the tests sign CRLs for it with the
// intermediate's and the root's keys (see crlServer below).
import { type ChildProcess, spawn } from "node:child_process";
import { createPrivateKey, webcrypto } from "node:crypto";
import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import https from "node:https";
import type { AddressInfo } from "node:net";
import net from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { Agent, request } from "undici";
import {
  createCa,
  createCrl,
  issueCertificate,
  type KeyPairPem,
  newSerial,
  type RevokedEntry,
} from "../../certs-dev/pki.js";
import { peculiar } from "../../proxy/x509.js";
import { freePort, type Tap } from "./mesh.js";
import { tool } from "./ops.js";

export const pebbleTool = tool("pebble", "pebble");
export const challtestsrvTool = tool("pebble-challtestsrv", "pebble");

/** The CA that signs the HTTPS certificates of Pebble and of the CRL server (ACME_CA_BUNDLE). */
export interface InfraCa {
  dir: string;
  /** ca.crt: the bundle to trust. */
  bundle: string;
  ca: KeyPairPem;
  /** A server certificate and key for these names and addresses, as files in `dir`. */
  server(name: string, dns: string[], ip: string[]): Promise<{ cert: string; key: string }>;
}

export async function infraCa(t: Tap): Promise<InfraCa> {
  const dir = mkdtempSync(join(tmpdir(), "ashmesh-infra-"));
  t.teardown(() => rmSync(dir, { recursive: true, force: true }));
  const ca = await createCa({ commonName: "ashmesh test infrastructure CA" });
  const bundle = join(dir, "ca.crt");
  writeFileSync(bundle, ca.certPem);
  return {
    dir,
    bundle,
    ca,
    async server(name, dns, ip) {
      const issued = await issueCertificate(ca, { commonName: dns[0] ?? name, dns, ip, days: 2 });
      const cert = join(dir, `${name}.crt`);
      const key = join(dir, `${name}.key`);
      writeFileSync(cert, issued.certPem);
      writeFileSync(key, issued.keyPem, { mode: 0o600 });
      return { cert, key };
    },
  };
}

export interface PebbleOptions {
  /** Where Pebble connects for tls-alpn-01 and http-01 (its tlsPort and httpPort). */
  tlsPort: number;
  httpPort?: number;
  /** Lifetime of the certificates it issues (certificateValidityPeriod). */
  validitySeconds?: number;
  /** Address Pebble listens on (default 127.0.0.1), and the ports (default: free ones). */
  host?: string;
  port?: number;
  managementPort?: number;
  /** Names its HTTPS certificate carries besides `host`. */
  dns?: string[];
  /** With challtestsrv: the address every name resolves to (default 127.0.0.1). Null: the system resolver. */
  resolveTo?: string | null;
  /** A command prefix, e.g. ["ip", "netns", "exec", "ns"]. */
  prefix?: string[];
  /** externalAccountMACKeys: kid → base64url HMAC key; EAB is then required. */
  eab?: Record<string, string>;
}

export interface Pebble {
  /** The ACME directory URL. */
  directory: string;
  host: string;
  port: number;
  managementUrl: string;
  infra: InfraCa;
  /** PEM of /roots/0, /intermediates/0, and their keys. */
  root(): Promise<string>;
  intermediate(): Promise<string>;
  rootKey(): Promise<string>;
  intermediateKey(): Promise<string>;
  log(): string;
  stop(): Promise<void>;
}

function waitForLine(
  child: ChildProcess,
  output: () => string,
  pattern: RegExp,
  ms: number,
  what: string,
): Promise<void> {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => {
      cleanup();
      reject(new Error(`${what}: no "${pattern}" within ${ms} ms: ${output().slice(-2000)}`));
    }, ms);
    const check = () => {
      if (pattern.test(output())) {
        cleanup();
        resolve();
      }
    };
    const exited = (code: number | null) => {
      cleanup();
      reject(new Error(`${what} exited (${code}): ${output().slice(-2000)}`));
    };
    const cleanup = () => {
      clearTimeout(timer);
      child.stdout?.off("data", check);
      child.stderr?.off("data", check);
      child.off("exit", exited);
    };
    child.stdout?.on("data", check);
    child.stderr?.on("data", check);
    child.on("exit", exited);
    check();
  });
}

/** Spawns a long-running command, kept for teardown; its output is collected. */
function daemon(
  t: Tap,
  command: string[],
  env: Record<string, string> = {},
): { child: ChildProcess; output: () => string; stop: () => Promise<void> } {
  const [bin, ...args] = command as [string, ...string[]];
  const child = spawn(bin, args, { env: { ...process.env, ...env }, stdio: ["ignore", "pipe", "pipe"] });
  let output = "";
  child.stdout?.on("data", (d: Buffer) => {
    output += d.toString("utf8");
  });
  child.stderr?.on("data", (d: Buffer) => {
    output += d.toString("utf8");
  });
  const exited = new Promise<void>((resolve) => child.once("exit", () => resolve()));
  const stop = async () => {
    if (child.exitCode === null && child.signalCode === null) child.kill("SIGTERM");
    const timer = setTimeout(() => child.kill("SIGKILL"), 5_000);
    await exited;
    clearTimeout(timer);
  };
  t.teardown(stop);
  return { child, output: () => output, stop };
}

export async function startPebble(t: Tap, infra: InfraCa, options: PebbleOptions): Promise<Pebble> {
  const host = options.host ?? "127.0.0.1";
  const prefix = options.prefix ?? [];
  const port = options.port ?? (await freePort());
  const managementPort = options.managementPort ?? (await freePort());
  const dir = mkdtempSync(join(tmpdir(), "ashmesh-pebble-"));
  t.teardown(() => rmSync(dir, { recursive: true, force: true }));
  const names = ["localhost", ...(options.dns ?? [])];
  const ips = [...new Set(["127.0.0.1", host])];
  const server = await infra.server(`pebble-${port}`, names, ips);
  const resolveTo = options.resolveTo === undefined ? "127.0.0.1" : options.resolveTo;
  const args: string[] = [];
  if (resolveTo !== null) {
    const dnsPort = await freePort();
    const cts = daemon(t, [
      ...prefix,
      challtestsrvTool.path as string,
      "-defaultIPv4",
      resolveTo,
      "-defaultIPv6",
      "",
      "-dns01",
      `127.0.0.1:${dnsPort}`,
      "-http01",
      "",
      "-https01",
      "",
      "-tlsalpn01",
      "",
      "-management",
      `127.0.0.1:${await freePort()}`,
    ]);
    await waitForLine(
      cts.child,
      cts.output,
      /Starting management server|management server/i,
      10_000,
      "pebble-challtestsrv",
    );
    args.push("-dnsserver", `127.0.0.1:${dnsPort}`);
  }
  const config = join(dir, "pebble-config.json");
  writeFileSync(
    config,
    JSON.stringify({
      pebble: {
        listenAddress: `${host}:${port}`,
        managementListenAddress: `${host}:${managementPort}`,
        certificate: server.cert,
        privateKey: server.key,
        httpPort: options.httpPort ?? 5002,
        tlsPort: options.tlsPort,
        ocspResponderURL: "",
        externalAccountBindingRequired: options.eab !== undefined,
        ...(options.eab ? { externalAccountMACKeys: options.eab } : {}),
        certificateValidityPeriod: options.validitySeconds ?? 86_400,
      },
    }),
  );
  const pebble = daemon(t, [...prefix, pebbleTool.path as string, "-config", config, "-strict", ...args], {
    // No random sleeps before validations; every order proves control again (no authz reuse),
    // so that renewals exercise the challenge on the running sidecar too.
    PEBBLE_VA_NOSLEEP: "1",
    PEBBLE_AUTHZREUSE: "0",
  });
  await waitForLine(pebble.child, pebble.output, /ACME directory available/, 15_000, "pebble");
  // Pebble prints that line just before it binds its two listeners (in goroutines): wait for the
  // ports themselves, or the first request may be refused.
  await Promise.all([listening(host, port, 15_000), listening(host, managementPort, 15_000)]);
  const managementUrl = `https://${host}:${managementPort}`;
  const dispatcher = new Agent({ connect: { ca: infra.ca.certPem } });
  t.teardown(() => dispatcher.close());
  const get = async (path: string) => {
    const r = await request(`${managementUrl}${path}`, { dispatcher });
    const text = await r.body.text();
    if (r.statusCode !== 200) throw new Error(`pebble ${path}: HTTP ${r.statusCode}: ${text}`);
    return text.endsWith("\n") ? text : `${text}\n`;
  };
  return {
    directory: `https://${host}:${port}/dir`,
    host,
    port,
    managementUrl,
    infra,
    root: () => get("/roots/0"),
    intermediate: () => get("/intermediates/0"),
    rootKey: () => get("/root-keys/0"),
    intermediateKey: () => get("/intermediate-keys/0"),
    log: pebble.output,
    stop: pebble.stop,
  };
}

/** Resolves once host:port accepts a TCP connection (tried every 20 ms), or rejects after timeoutMs. */
async function listening(host: string, port: number, timeoutMs: number): Promise<void> {
  const until = Date.now() + timeoutMs;
  for (;;) {
    const ok = await new Promise<boolean>((resolve) => {
      const socket = net.connect(port, host);
      socket.once("connect", () => {
        socket.destroy();
        resolve(true);
      });
      socket.once("error", () => resolve(false));
    });
    if (ok) return;
    if (Date.now() > until) throw new Error(`pebble: nothing listens on ${host}:${port} after ${timeoutMs} ms`);
    await new Promise((resolve) => setTimeout(resolve, 20));
  }
}

/**
 * A TCP forwarder in front of a server, which can be taken down and brought back on the same
 * port: "the CA is down" as an ACME client sees it (connection refused), then back.
 */
export async function forwarder(
  t: Tap,
  target: { host: string; port: number },
): Promise<{ port: number; down(): Promise<void>; up(): Promise<void> }> {
  const sockets = new Set<net.Socket>();
  let server: net.Server | null = null;
  let port = 0;
  const up = async () => {
    const s = net.createServer((client) => {
      const upstream = net.connect(target.port, target.host);
      for (const socket of [client, upstream]) {
        sockets.add(socket);
        socket.on("close", () => sockets.delete(socket));
        socket.on("error", () => {
          client.destroy();
          upstream.destroy();
        });
      }
      client.pipe(upstream).pipe(client);
    });
    await new Promise<void>((resolve) => s.listen(port, "127.0.0.1", resolve));
    port = (s.address() as AddressInfo).port;
    server = s;
  };
  const down = async () => {
    const s = server;
    server = null;
    for (const socket of sockets) socket.destroy();
    if (s) await new Promise((resolve) => s.close(resolve));
  };
  await up();
  t.teardown(down);
  return {
    get port() {
      return port;
    },
    down,
    up,
  };
}

/** A CA's certificate and key (PEM): what signs CRLs. */
export interface CrlSigners {
  root: KeyPairPem;
  intermediate: KeyPairPem;
}

async function signingKey(keyPem: string): Promise<webcrypto.CryptoKey> {
  const der = createPrivateKey(keyPem).export({ type: "pkcs8", format: "der" });
  return (await webcrypto.subtle.importKey("pkcs8", der, RSA, false, ["sign"])) as webcrypto.CryptoKey;
}

const RSA = { name: "RSASSA-PKCS1-v1_5", hash: "SHA-256" } as const;

/**
 * Pebble's root and intermediate, certified again with the cRLSign key usage. Pebble 2.4 makes
 * its CA certificates with keyCertSign and digitalSignature only, and OpenSSL refuses any CRL a
 * CA without cRLSign signs (X509_V_ERR_KEYUSAGE_NO_CRL_SIGN) — so no CRL signed with Pebble's
 * keys could ever be used against its own certificates. These are the same names, keys and key
 * identifiers: Pebble's leaves chain to them unchanged. The test trusts these (tls.ca) and signs
 * the CRLs with Pebble's keys under them, as a CA that publishes CRLs would.
 */
export async function crlSigners(pebble: Pebble): Promise<CrlSigners> {
  const x509 = await peculiar();
  const root = new x509.X509Certificate(await pebble.root());
  const intermediate = new x509.X509Certificate(await pebble.intermediate());
  const rootKey = await pebble.rootKey();
  const intermediateKey = await pebble.intermediateKey();
  const usages = x509.KeyUsageFlags.keyCertSign | x509.KeyUsageFlags.cRLSign | x509.KeyUsageFlags.digitalSignature;
  const ski = (cert: typeof root) => cert.getExtension(x509.SubjectKeyIdentifierExtension);
  const certify = async (cert: typeof root, issuer: typeof root | null, signer: string) => {
    const keyId = ski(cert);
    const made = await x509.X509CertificateGenerator.create({
      serialNumber: newSerial(),
      subject: cert.subjectName,
      issuer: issuer ? issuer.subjectName : cert.subjectName,
      notBefore: cert.notBefore,
      notAfter: cert.notAfter,
      publicKey: await cert.publicKey.export(RSA, ["verify"]),
      signingKey: await signingKey(signer),
      signingAlgorithm: RSA,
      extensions: [
        new x509.BasicConstraintsExtension(true, undefined, true),
        new x509.KeyUsagesExtension(usages, true),
        ...(keyId ? [keyId] : []),
        ...(issuer && ski(issuer) ? [new x509.AuthorityKeyIdentifierExtension(ski(issuer)?.keyId as string)] : []),
      ],
    });
    return `${made.toString("pem")}\n`;
  };
  const rootPem = await certify(root, null, rootKey);
  const intermediatePem = await certify(intermediate, new x509.X509Certificate(rootPem), rootKey);
  return {
    root: { certPem: rootPem, keyPem: rootKey },
    intermediate: { certPem: intermediatePem, keyPem: intermediateKey },
  };
}

/**
 * The CA's CRL distribution point, played by the test (Pebble 2.4 has none): an HTTPS server
 * with a certificate of the infrastructure CA, serving DER CRLs signed with the keys Pebble hands
 * out (under the certificates of crlSigners), /intermediate.crl and /root.crl. `revoke`
 * publishes a new CRL of the intermediate.
 */
export interface CrlServer {
  urls: string[];
  revoke(serial: string): Promise<void>;
  requests: number;
}

export async function crlServer(
  t: Tap,
  pebble: Pebble,
  signers: CrlSigners,
  options: { host?: string; port?: number; name?: string; nextUpdateDays?: number } = {},
): Promise<CrlServer> {
  const host = options.host ?? "127.0.0.1";
  const name = options.name ?? host;
  const { intermediate, root } = signers;
  const revoked: RevokedEntry[] = [];
  let number = 1;
  const der = (pem: string) => Buffer.from(pem.replace(/-----[^-]+-----|\s/g, ""), "base64");
  const sign = async (ca: KeyPairPem, list: RevokedEntry[]) =>
    der(await createCrl(ca, { revoked: list, number: number++, nextUpdateDays: options.nextUpdateDays ?? 1 }));
  const lists = { intermediate: await sign(intermediate, revoked), root: await sign(root, []) };
  const tlsFiles = await pebble.infra.server(`crl-${name}`, [name], host.match(/^\d/) ? [host] : []);
  const { readFileSync } = await import("node:fs");
  const state = { requests: 0 };
  const server = https.createServer(
    { cert: readFileSync(tlsFiles.cert), key: readFileSync(tlsFiles.key) },
    (req, res) => {
      state.requests++;
      const body = req.url === "/intermediate.crl" ? lists.intermediate : req.url === "/root.crl" ? lists.root : null;
      if (!body) {
        res.writeHead(404).end();
        return;
      }
      res.writeHead(200, { "content-type": "application/pkix-crl", "content-length": body.length });
      res.end(body);
    },
  );
  await new Promise<void>((resolve) => server.listen(options.port ?? 0, host, resolve));
  t.teardown(() => {
    server.closeAllConnections();
    server.close();
  });
  const port = (server.address() as AddressInfo).port;
  return {
    urls: [`https://${name}:${port}/intermediate.crl`, `https://${name}:${port}/root.crl`],
    async revoke(serial) {
      revoked.push({ serial, revokedAt: new Date() });
      lists.intermediate = await sign(intermediate, revoked);
    },
    get requests() {
      return state.requests;
    },
  };
}
