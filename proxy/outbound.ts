// The outbound proxy carries the local application's plain-HTTP calls to other services of the
// mesh over mutual TLS: as a forward proxy (HTTP_PROXY, absolute-form requests) limited to the
// configured destinations, and on port-mapped listeners fixed to one upstream each. It binds to
// loopback only, presents our client certificate, and accepts a server only when its certificate
// names the identity the request was meant for (and matches the pin, when one is set).
import http, { type IncomingMessage, type ServerResponse } from "node:http";
import { type AddressInfo, isIP, type Socket } from "node:net";
import type { SecureContext } from "node:tls";
import { Pool } from "undici";
import type { Config } from "../config/schema.js";
import { parseHostPort } from "../config/schema.js";
import { mtlsConnector, type Upstream } from "./connector.js";
import type { EdgeCounter, Edges } from "./edges.js";
import { answerClientError, ProxyError, sendError, writeSocketError } from "./errors.js";
import { forward, forwardRequestHeaders, protocolOf, refuseRequest } from "./forward.js";
import type { Identity } from "./identity.js";
import type { IdentityChange } from "./identity-store.js";
import type { Logger } from "./log.js";
import type { Metrics, RequestRecorder } from "./metrics.js";
import { compileMatcher, type IdentityMatcher, matchesName } from "./policy.js";
import { clientSecureContext, failureReason, isTlsFailure, PeerRefusedError } from "./tls.js";

interface Route {
  upstream: Upstream;
  pool: Pool;
  /**
   * The route's metrics and edge. A configured upstream or an exact `destinations` entry has them
   * from the start: the configuration bounds them. A name that only matched a wildcard gets them
   * once a server proved that identity: until then it is only a name the app asked for, and a
   * label per such name would let an app (or a typo loop) grow the metrics, /edges and the pools
   * without bound (DESIGN §4: labels stay bounded).
   */
  labels: { recorder: RequestRecorder; edge: EdgeCounter } | null;
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
  /** Names the configuration itself bounds: `destinations` entries without a wildcard, `resolve` keys. */
  private readonly exactDestinations: Set<string>;
  private generation: Generation;
  private retired: Generation[] = [];
  private identity: Identity;
  private draining = false;
  /** Requests to wildcard destinations no server has proved (see Route.labels): one label. */
  private readonly unverified: RequestRecorder;

  constructor(private readonly deps: OutboundDeps) {
    this.identity = deps.identity;
    this.unverified = deps.metrics.recorder("outbound", "unverified");
    this.destinations = compileMatcher(deps.config.outbound.destinations);
    this.exactDestinations = new Set(
      [
        ...deps.config.outbound.destinations.filter((d) => !d.includes("*")),
        ...Object.keys(deps.config.outbound.resolve),
      ].map((d) => d.toLowerCase()),
    );
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

  /**
   * The upstream for a peer identity reached at `connectHost` (default: the identity itself).
   * `resolve` rewrites the address of the host connected to, as curl --resolve does: never the
   * identity a server must prove (config/load.ts refuses a resolve entry that would look like it).
   */
  private upstreamFor(identity: string, port: number, pin: string | null, connectHost?: string): Upstream {
    let host = connectHost ?? identity;
    const override = this.deps.config.outbound.resolve[host.toLowerCase()];
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
        maxHeaderSize: limits.maxHeaderBytes,
        noDelay: true,
      },
      (req, res) => this.onRequest(req, res, fixed?.upstream ?? null),
    );
    server.maxConnections = limits.maxConnections;
    // Node drops header lines past maxHeadersCount without a word; refuseRequest counts them instead.
    server.maxHeadersCount = 0;
    server.on("connect", (_req, socket: Socket) => {
      // HTTPS through the proxy would be TLS inside TLS and unauthenticated to us: refuse clearly.
      writeSocketError(
        socket,
        new ProxyError(
          "method_not_allowed",
          "CONNECT is not supported: call http://<service>/ and the sidecar adds mTLS",
        ),
      );
    });
    server.on("upgrade", (_req, socket: Socket) => {
      writeSocketError(socket, new ProxyError("not_implemented", "HTTP upgrade (WebSocket) is not proxied"));
    });
    server.on("clientError", (err: NodeJS.ErrnoException, socket: Socket) => {
      const status = answerClientError(err, socket);
      if (status) this.unverified.record("http1", status, 0);
    });
    return server;
  }

  /** Listens on each configured address; the forward proxy on `forwardFd` when systemd handed it over. */
  async listen(forwardFd?: number): Promise<Array<{ name: string; address: AddressInfo }>> {
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
        const inherited = i === 0 && outbound.listen && forwardFd !== undefined;
        server.listen(inherited ? { fd: forwardFd } : { port: spec.port, host: spec.host }, () => {
          server.off("error", reject);
          resolve();
        });
      });
      out.push({ name: spec.name, address: server.address() as AddressInfo });
    }
    return out;
  }

  /** The route (pool, metrics, edge) for an upstream in the current generation; made on first use. */
  private route(upstream: Upstream, wildcard: boolean): Route {
    const generation = this.generation;
    let route = generation.routes.get(upstream);
    if (!route) {
      const made: Route = { upstream, pool: undefined as unknown as Pool, labels: null };
      made.pool = this.createPool(upstream, generation.context, () => this.labelsOf(made));
      if (!wildcard) this.labelsOf(made);
      route = made;
      generation.routes.set(upstream, route);
    }
    return route;
  }

  /** The recorder and edge of a route, made on first use. */
  private labelsOf(route: Route): { recorder: RequestRecorder; edge: EdgeCounter } {
    if (!route.labels) {
      const { upstream } = route;
      route.labels = {
        recorder: this.deps.metrics.recorder("outbound", upstream.identity),
        edge: this.deps.edges.edge({
          direction: "outbound",
          src: this.deps.config.service.name,
          dst: upstream.label,
          src_identity: this.identity.client.summary.identity,
          dst_identity: upstream.identity,
        }),
      };
    }
    return route.labels;
  }

  private createPool(
    upstream: Upstream,
    context: SecureContext,
    labels: () => { recorder: RequestRecorder; edge: EdgeCounter },
  ): Pool {
    const { limits } = this.deps.config;
    const { metrics, logger } = this.deps;
    const identity = this.identity;
    const connect = mtlsConnector(
      upstream,
      context,
      identity.ca.certs,
      {
        connected: (socket, state, seconds) => {
          metrics.handshakeOk("outbound", seconds);
          metrics.trackConnection("outbound", socket.alpnProtocol === "h2" ? "h2" : "http1", socket);
          labels().edge.tls(state.version, state.cipher);
          logger.info({
            event: "mtls_handshake_complete",
            client_cn: identity.client.peer.commonName ?? identity.client.summary.identity,
            server_cn: upstream.identity,
            tls_version: state.version,
            cipher_suite: state.cipher,
            direction: "outbound",
            remote_addr: `${upstream.host}:${upstream.port}`,
            resumed: state.resumed,
          });
        },
        failed: (err) => {
          if (!isTlsFailure(err)) return; // TCP and DNS failures are not handshakes
          const reason =
            err instanceof PeerRefusedError ? err.refusal.reason : failureReason((err as NodeJS.ErrnoException).code);
          metrics.handshakeFailed("outbound", reason);
          logger.warn({
            event: "mtls_handshake_failed",
            direction: "outbound",
            reason,
            detail: err.message,
            remote_addr: `${upstream.host}:${upstream.port}`,
            server_identity: upstream.identity,
          });
        },
      },
      limits,
    );
    return new Pool(`https://${upstream.identity}:${upstream.port}`, {
      connect,
      connections: limits.upstreamConnections,
      keepAliveTimeout: limits.upstreamKeepAliveMs,
      keepAliveMaxTimeout: limits.idleTimeoutMs,
      headersTimeout: limits.upstreamTimeoutMs,
      bodyTimeout: limits.upstreamTimeoutMs,
    });
  }

  private onRequest(req: IncomingMessage, res: ServerResponse, fixed: Upstream | null): void {
    const started = performance.now();
    const refused = refuseRequest(req, this.deps.config.limits);
    if (refused) {
      // The body, if any, is not read: nothing after a refused head may be taken as a request.
      res.shouldKeepAlive = false;
      sendError(res, refused);
      this.unverified.record(protocolOf(req), refused.status, (performance.now() - started) / 1000);
      return;
    }
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
    const protocol = protocolOf(req);
    const route = this.route(upstream, fixed === null && !this.exactDestinations.has(upstream.identity));
    forward(req, res, {
      dispatcher: route.pool,
      target: upstream.label,
      side: "peer",
      path,
      headers: forwardRequestHeaders(req.rawHeaders, req.headers.connection, [], host),
      timeoutMs: this.deps.config.limits.upstreamTimeoutMs,
      done: (status) => {
        const seconds = (performance.now() - started) / 1000;
        if (route.labels) {
          route.labels.recorder.record(protocol, status, seconds);
          route.labels.edge.hit();
          return;
        }
        // A wildcard name no server has proved (it does not resolve, refuses, or failed the
        // handshake): one shared label, and the route is dropped so made-up names cost nothing.
        this.unverified.record(protocol, status, seconds);
        if (this.generation.routes.get(route.upstream) === route) {
          this.generation.routes.delete(route.upstream);
          this.upstreams.delete(route.upstream.identity);
          void route.pool.close();
        }
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
