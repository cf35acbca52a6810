// The outbound proxy carries the local application's plain-HTTP calls to other services of the
// mesh over mutual TLS: as a forward proxy (HTTP_PROXY, absolute-form requests) limited to the
// configured destinations, and on port-mapped listeners fixed to one upstream each. It binds to
// loopback only, presents our client certificate, and accepts a server only when its certificate
// names the identity the request was meant for (and matches the pin, when one is set).
import { createHash, type X509Certificate } from "node:crypto";
import http, { type IncomingMessage, type ServerResponse } from "node:http";
import { type AddressInfo, isIP, type Socket } from "node:net";
import type { SecureContext, TLSSocket } from "node:tls";
import { buildConnector, Pool } from "undici";
import type { Config } from "../config/schema.js";
import { parseHostPort } from "../config/schema.js";
import type { EdgeCounter, Edges } from "./edges.js";
import { ProxyError, sendError } from "./errors.js";
import { forward, forwardRequestHeaders } from "./forward.js";
import type { Identity, IdentityChange } from "./identity.js";
import type { Logger } from "./log.js";
import type { Metrics, RequestRecorder } from "./metrics.js";
import { compileMatcher, type IdentityMatcher, matchesName, parseSubjectAltName, rfc2253 } from "./policy.js";
import { clientSecureContext, failureReason, isTlsFailure, refusalReason } from "./tls.js";

/** Where requests for one logical peer go, and what its certificate must say. */
interface Upstream {
  /** The identity the server's certificate must carry (a DNS or URI SAN). */
  identity: string;
  /** Where to connect: the peer's name, or a `resolve` override. */
  host: string;
  port: number;
  pin: string | null;
  /** "auth.ashchan.local:8443", for messages and the edges list. */
  label: string;
}

interface Route {
  upstream: Upstream;
  pool: Pool;
  recorder: RequestRecorder;
  edge: EdgeCounter;
}

/** The pools and the client context of one identity; replaced whole when the identity changes. */
interface Generation {
  context: SecureContext;
  /** Keyed by the Upstream value itself: two upstreams with one address may differ in pin. */
  routes: Map<Upstream, Route>;
}

export interface OutboundDeps {
  config: Config;
  identity: Identity;
  metrics: Metrics;
  logger: Logger;
  edges: Edges;
}

/**
 * Decides whether a server that completed its handshake is the one the request is meant for:
 * the chain verified (against our CA bundle and CRL), an exact DNS or URI SAN equal to the
 * expected identity (never a wildcard), and the SPKI pin when one is set. Returns the refusal
 * as an error whose code feeds the failure reason, or null.
 */
export function verifyServer(socket: TLSSocket, upstream: Upstream, trust: readonly X509Certificate[]): Error | null {
  const cert = socket.getPeerX509Certificate();
  const refuse = (code: string, message: string) => Object.assign(new Error(message), { code });
  if (!cert) return refuse("ASHMESH_PEER_NO_CERT", `${upstream.label} presented no certificate`);
  if (!socket.authorized) {
    const code = String(socket.authorizationError ?? "UNKNOWN");
    const reason = refusalReason(code, cert, trust);
    return refuse(
      reason === "unknown_ca" ? "ASHMESH_PEER_UNKNOWN_CA" : code,
      `${upstream.label}: the server certificate did not verify: ${reason} (${code})`,
    );
  }
  const names = parseSubjectAltName(cert.subjectAltName).filter((n) => n.type === "DNS" || n.type === "URI");
  const match = names.some((n) =>
    n.type === "DNS" ? n.value.toLowerCase() === upstream.identity : n.value === upstream.identity,
  );
  if (!match) {
    const presented = names.map((n) => n.value).join(", ") || rfc2253(cert.subject);
    return refuse(
      "ASHMESH_PEER_IDENTITY",
      `${upstream.label} presented a certificate for ${presented}, not for ${upstream.identity}`,
    );
  }
  if (upstream.pin) {
    const spki = cert.publicKey.export({ type: "spki", format: "der" });
    const pin = createHash("sha256").update(spki).digest("base64");
    if (pin !== upstream.pin.replace(/^sha256\/\/?/, "")) {
      return refuse(
        "ASHMESH_PEER_PIN",
        `${upstream.label} presented a key whose SPKI pin sha256//${pin} is not the configured pin`,
      );
    }
  }
  return null;
}

/** "http://host:port/p?q" → "/p?q". */
function originForm(target: string): string {
  const scheme = target.indexOf("://");
  if (scheme === -1) return `/${target}`;
  const slash = target.indexOf("/", scheme + 3);
  return slash === -1 ? "/" : target.slice(slash);
}

export class Outbound {
  private readonly servers: http.Server[] = [];
  private readonly destinations: IdentityMatcher;
  private generation: Generation;
  private retired: Generation[] = [];
  private identity: Identity;
  private draining = false;

  constructor(private readonly deps: OutboundDeps) {
    this.identity = deps.identity;
    this.destinations = compileMatcher(deps.config.outbound.destinations);
    this.generation = this.newGeneration(deps.identity);
    const { outbound } = deps.config;
    if (outbound.listen) this.servers.push(this.createServer(null));
    for (const [name, spec] of Object.entries(outbound.upstreams)) {
      const target = parseHostPort(spec.target) as { host: string; port: number };
      const upstream = this.upstreamFor(spec.identity ?? target.host.toLowerCase(), target.port, spec.pin, target.host);
      this.servers.push(this.createServer({ name, upstream }));
    }
  }

  private newGeneration(identity: Identity): Generation {
    return { context: clientSecureContext(identity, this.deps.config.tls), routes: new Map() };
  }

  /** The upstream for a peer identity, `resolve` overrides applied. */
  private upstreamFor(identity: string, port: number, pin: string | null, connectHost?: string): Upstream {
    const override = this.deps.config.outbound.resolve[identity];
    let host = connectHost ?? identity;
    if (override) {
      const parsed = isIP(override) ? { host: override, port } : parseHostPort(override);
      if (parsed) {
        host = parsed.host;
        port = parsed.port;
      }
    }
    return { identity, host, port, pin, label: `${identity}:${port}` };
  }

  private createServer(fixed: { name: string; upstream: Upstream } | null): http.Server {
    const { limits } = this.deps.config;
    const server = http.createServer(
      {
        keepAliveTimeout: limits.idleTimeoutMs,
        headersTimeout: limits.headersTimeoutMs,
        requestTimeout: limits.requestTimeoutMs,
        noDelay: true,
      },
      (req, res) => this.onRequest(req, res, fixed?.upstream ?? null),
    );
    server.maxConnections = limits.maxConnections;
    server.on("connect", (_req, socket: Socket) => {
      // HTTPS through the proxy would be TLS inside TLS and unauthenticated to us: refuse clearly.
      const body =
        '{"error":"method_not_allowed","message":"CONNECT is not supported: call http://<service>/ and the sidecar adds mTLS"}';
      socket.end(
        `HTTP/1.1 405 Method Not Allowed\r\ncontent-type: application/json\r\ncontent-length: ${body.length}\r\nconnection: close\r\n\r\n${body}`,
      );
    });
    server.on("upgrade", (_req, socket: Socket) => {
      socket.end("HTTP/1.1 501 Not Implemented\r\nconnection: close\r\ncontent-length: 0\r\n\r\n");
    });
    server.on("clientError", (err: NodeJS.ErrnoException, socket: Socket) => {
      if (err.code === "ECONNRESET" || !socket.writable) return socket.destroy();
      socket.end("HTTP/1.1 400 Bad Request\r\nconnection: close\r\ncontent-length: 0\r\n\r\n");
    });
    return server;
  }

  async listen(): Promise<Array<{ name: string; address: AddressInfo }>> {
    const { outbound } = this.deps.config;
    const listens = [
      ...(outbound.listen ? [{ name: "forward proxy", ...outbound.listen }] : []),
      ...Object.entries(outbound.upstreams).map(([name, u]) => ({ name: `upstream ${name}`, ...u.listen })),
    ];
    const out: Array<{ name: string; address: AddressInfo }> = [];
    for (const [i, server] of this.servers.entries()) {
      const spec = listens[i] as { name: string; host: string; port: number };
      await new Promise<void>((resolve, reject) => {
        server.once("error", reject);
        server.listen(spec.port, spec.host, () => {
          server.off("error", reject);
          resolve();
        });
      });
      out.push({ name: spec.name, address: server.address() as AddressInfo });
    }
    return out;
  }

  /** The route (pool, metrics, edge) for an upstream in the current generation; made on first use. */
  private route(upstream: Upstream): Route {
    const generation = this.generation;
    let route = generation.routes.get(upstream);
    if (!route) {
      const edge = this.deps.edges.edge({
        direction: "outbound",
        src: this.deps.config.service.name,
        dst: upstream.label,
        src_identity: this.identity.client.summary.identity,
        dst_identity: upstream.identity,
      });
      route = {
        upstream,
        pool: this.createPool(upstream, generation.context, edge),
        recorder: this.deps.metrics.recorder("outbound", upstream.identity),
        edge,
      };
      generation.routes.set(upstream, route);
    }
    return route;
  }

  private createPool(upstream: Upstream, context: SecureContext, edge: EdgeCounter): Pool {
    const { limits } = this.deps.config;
    const { metrics, logger } = this.deps;
    const base = buildConnector({
      secureContext: context,
      // verifyServer decides (below), so that a refusal carries its real reason and the names seen.
      rejectUnauthorized: false,
      checkServerIdentity: () => undefined,
      maxCachedSessions: 100,
      timeout: 5_000,
      noDelay: true,
    } as buildConnector.BuildOptions);
    const connect: buildConnector.connector = (options, callback) => {
      const started = performance.now();
      const fail = (err: Error) => {
        const code = (err as NodeJS.ErrnoException).code;
        if (isTlsFailure(code)) {
          const reason = failureReason(code);
          metrics.handshakeFailed("outbound", reason);
          logger.warn({
            event: "mtls_handshake_failed",
            direction: "outbound",
            reason,
            detail: err.message,
            remote_addr: `${upstream.host}:${upstream.port}`,
            server_identity: upstream.identity,
          });
        }
        callback(err, null);
      };
      base(
        // The name is the identity (SNI, session cache); the address may be a resolve override.
        { ...options, hostname: upstream.host, port: String(upstream.port), servername: upstream.identity },
        (err, socket) => {
          if (err) return fail(err);
          const tlsSocket = socket as TLSSocket;
          const refusal = verifyServer(tlsSocket, upstream, this.identity.ca.certs);
          if (refusal) {
            tlsSocket.destroy();
            return fail(refusal);
          }
          metrics.handshakeOk("outbound", (performance.now() - started) / 1000);
          edge.tls(tlsSocket.getProtocol() ?? "unknown", tlsSocket.getCipher()?.standardName ?? "unknown");
          metrics.openConnections.inc({ direction: "outbound" });
          tlsSocket.once("close", () => metrics.openConnections.dec({ direction: "outbound" }));
          const cert: X509Certificate | undefined = tlsSocket.getPeerX509Certificate?.();
          logger.info({
            event: "mtls_handshake_complete",
            client_cn: this.identity.client.peer.commonName ?? this.identity.client.summary.identity,
            server_cn:
              cert?.subject
                .split("\n")
                .find((l) => l.startsWith("CN="))
                ?.slice(3) ?? upstream.identity,
            tls_version: tlsSocket.getProtocol(),
            cipher_suite: tlsSocket.getCipher()?.standardName,
            direction: "outbound",
            remote_addr: `${upstream.host}:${upstream.port}`,
            resumed: tlsSocket.isSessionReused(),
          });
          callback(null, socket);
        },
      );
    };
    return new Pool(`https://${upstream.identity}:${upstream.port}`, {
      connect,
      connections: limits.upstreamConnections,
      keepAliveTimeout: 4_000,
      keepAliveMaxTimeout: limits.idleTimeoutMs,
      headersTimeout: limits.upstreamTimeoutMs,
      bodyTimeout: limits.upstreamTimeoutMs,
    });
  }

  private onRequest(req: IncomingMessage, res: ServerResponse, fixed: Upstream | null): void {
    const started = performance.now();
    let upstream = fixed;
    let path = req.url ?? "/";
    let host: string | undefined;
    if (!upstream) {
      const target = this.parseTarget(req);
      if (target instanceof ProxyError) {
        sendError(res, target);
        return;
      }
      upstream = target.upstream;
      path = target.path;
      host = target.host;
    } else {
      host = upstream.identity;
      // A server must accept absolute-form too (RFC 9112 §3.2.2); the upstream is fixed anyway.
      if (!path.startsWith("/")) path = originForm(path);
    }
    if (this.draining) res.shouldKeepAlive = false;
    const route = this.route(upstream);
    forward(req, res, {
      dispatcher: route.pool,
      target: upstream.label,
      side: "peer",
      path,
      headers: forwardRequestHeaders(req.rawHeaders, req.headers.connection, [], host),
      timeoutMs: this.deps.config.limits.upstreamTimeoutMs,
      done: (status) => {
        route.recorder.record(status, (performance.now() - started) / 1000);
        route.edge.hit();
      },
    });
  }

  /** The destination of a forward-proxy request: absolute-form URL, or origin-form with Host. */
  private parseTarget(req: IncomingMessage): { upstream: Upstream; path: string; host: string } | ProxyError {
    const url = req.url ?? "/";
    let authority: string;
    let path: string;
    if (url.startsWith("http://")) {
      const slash = url.indexOf("/", 7);
      authority = slash === -1 ? url.slice(7) : url.slice(7, slash);
      path = slash === -1 ? "/" : url.slice(slash);
    } else if (url.startsWith("/")) {
      authority = req.headers.host ?? "";
      path = url;
    } else if (/^https:\/\//i.test(url)) {
      return new ProxyError("bad_request", "call the service over http://; the sidecar adds mutual TLS itself");
    } else {
      return new ProxyError("bad_request", `cannot proxy the request target ${JSON.stringify(url.slice(0, 100))}`);
    }
    if (authority.includes("@")) return new ProxyError("bad_request", "credentials in the URL are not forwarded");
    const name = (
      authority.startsWith("[") ? authority.slice(0, authority.indexOf("]") + 1) : (authority.split(":")[0] ?? "")
    )
      .toLowerCase()
      .replace(/\.$/, "");
    if (!name) return new ProxyError("bad_request", "the request names no destination host");
    if (!matchesName(this.destinations, name)) {
      this.deps.logger.info({ event: "destination_denied", destination: name });
      return new ProxyError(
        "destination_not_allowed",
        `${name} is not in outbound.destinations (${this.deps.config.outbound.destinations.join(", ") || "none"})`,
        { destination: name },
      );
    }
    // The port the app wrote is the peer app's own; mesh traffic always goes to the peer's inbound.
    return { upstream: this.cachedUpstream(name), path, host: authority };
  }

  private readonly upstreams = new Map<string, Upstream>();

  private cachedUpstream(name: string): Upstream {
    let upstream = this.upstreams.get(name);
    if (!upstream) {
      upstream = this.upstreamFor(name, this.deps.config.outbound.port, null);
      if (this.upstreams.size >= 10_000) this.upstreams.clear();
      this.upstreams.set(name, upstream);
    }
    return upstream;
  }

  /**
   * A new identity (client certificate, CA or CRL): new connections use it at once, through a
   * new generation of pools; the old pools finish their requests and then close.
   */
  applyIdentity(change: IdentityChange): void {
    this.identity = change.next;
    const old = this.generation;
    this.generation = this.newGeneration(change.next);
    this.retired.push(old);
    const pools = [...old.routes.values()].map((r) => r.pool);
    void Promise.allSettled(pools.map((p) => p.close())).then(() => {
      this.retired = this.retired.filter((g) => g !== old);
    });
  }

  async drain(deadline: number): Promise<void> {
    this.draining = true;
    const closed = Promise.all(this.servers.map((s) => new Promise<void>((resolve) => s.close(() => resolve()))));
    for (const s of this.servers) s.closeIdleConnections();
    const poll = setInterval(() => {
      for (const s of this.servers) s.closeIdleConnections();
    }, 50);
    const timer = new Promise<void>((resolve) => setTimeout(resolve, Math.max(0, deadline - Date.now())).unref());
    await Promise.race([closed, timer]);
    clearInterval(poll);
    await this.close();
  }

  async close(): Promise<void> {
    for (const s of this.servers) {
      s.closeAllConnections();
      s.close();
    }
    const pools = [this.generation, ...this.retired].flatMap((g) => [...g.routes.values()].map((r) => r.pool));
    await Promise.allSettled(pools.map((p) => p.destroy()));
  }
}
