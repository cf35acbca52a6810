// How outbound opens one mTLS connection to a peer, as an undici connector: TCP + TLS with our
// client context, the server classified by tls.ts (chain, identity, pin) before undici may send a
// byte, and a session cache that only ever holds sessions of servers that passed that check.
// undici's own connector caches every session it sees, including one from a server we then
// refuse; and a resumed session carries no peer certificate on the client side (nodejs/node#35317),
// so a cache we do not control would be a way around the identity check.
import type { X509Certificate } from "node:crypto";
import tls, { type SecureContext, type TLSSocket } from "node:tls";
import type { buildConnector } from "undici";
import type { Config } from "../config/schema.js";
import type { Identity } from "./identity.js";
import type { Logger } from "./log.js";
import type { Metrics } from "./metrics.js";
import type { PeerIdentity } from "./policy.js";
import {
  classifyOutbound,
  classifyResumed,
  type Expected,
  failureReason,
  isTlsFailure,
  PeerRefusedError,
  type Verified,
} from "./tls.js";

/** Where requests for one logical peer go, and what its certificate must say. */
export interface Upstream extends Expected {
  /** Where to connect: the peer's name, or a `resolve` override. */
  host: string;
  port: number;
}

export interface ConnectorHooks {
  /** A verified connection: its TLS state and the handshake time. */
  connected(socket: TLSSocket, state: Verified, seconds: number): void;
  /** A TLS or network failure, before undici sees it. */
  failed(err: Error): void;
}

/**
 * The outbound handshake's log lines and metrics, the same for an HTTP route and a TCP listener
 * (`fields` adds e.g. its `listener`); `connected` then does what the caller keeps per connection.
 */
export function reportingHooks(
  upstream: Upstream,
  identity: Identity,
  deps: { metrics: Metrics; logger: Logger },
  fields: Record<string, string>,
  connected: (socket: TLSSocket, state: Verified) => void,
): ConnectorHooks {
  const { metrics, logger } = deps;
  const remote = `${upstream.host}:${upstream.port}`;
  return {
    connected: (socket, state, seconds) => {
      metrics.handshakeOk("outbound", seconds);
      connected(socket, state);
      logger.info({
        event: "mtls_handshake_complete",
        client_cn: identity.client.peer.commonName ?? identity.client.summary.identity,
        server_cn: upstream.identity,
        tls_version: state.version,
        cipher_suite: state.cipher,
        direction: "outbound",
        remote_addr: remote,
        resumed: state.resumed,
        alpn: socket.alpnProtocol || null,
        ...fields,
      });
    },
    failed: (err) => {
      if (!isTlsFailure(err)) return; // TCP and DNS failures are not handshakes: the caller reports them
      const reason =
        err instanceof PeerRefusedError ? err.refusal.reason : failureReason((err as NodeJS.ErrnoException).code);
      metrics.handshakeFailed("outbound", reason);
      logger.warn({
        event: "mtls_handshake_failed",
        direction: "outbound",
        reason,
        detail: err.message,
        remote_addr: remote,
        server_identity: upstream.identity,
        ...fields,
      });
    },
  };
}

/**
 * Verified mTLS connections to one peer. The latest session of a verified server is kept with
 * the identity it proved: TLS 1.3 tickets may be reused for full resumption (no early data is
 * ever sent), so one is enough for every connection to the peer.
 */
export class PeerConnector {
  private session: { ticket: Buffer; peer: PeerIdentity } | undefined;

  constructor(
    private readonly upstream: Upstream,
    private readonly context: SecureContext,
    private readonly trust: readonly X509Certificate[],
    private readonly hooks: ConnectorHooks,
    private readonly limits: Pick<Config["limits"], "connectTimeoutMs" | "tcpKeepAliveMs">,
  ) {}

  /** A TCP + TLS connection offering `alpn`, handed over only once the server passed classifyOutbound. */
  connect(alpn: readonly string[]): Promise<TLSSocket> {
    const { upstream, hooks, limits } = this;
    const timeoutMs = limits.connectTimeoutMs;
    return new Promise((resolve, reject) => {
      const started = performance.now();
      let settled = false;
      let verified: PeerIdentity | null = null;
      let pending: Buffer | undefined;
      const offered = this.session;
      const socket = tls.connect({
        host: upstream.host,
        port: upstream.port,
        servername: upstream.identity,
        secureContext: this.context,
        ...(offered ? { session: offered.ticket } : {}),
        // classifyOutbound decides below, so that a refusal carries its real reason and the names seen.
        rejectUnauthorized: false,
        checkServerIdentity: () => undefined,
        ALPNProtocols: [...alpn],
      });
      socket.setNoDelay(true);
      socket.setKeepAlive(true, limits.tcpKeepAliveMs);
      const finish = (err: Error | null) => {
        if (settled) return;
        settled = true;
        clearTimeout(timer);
        if (err) {
          socket.destroy();
          hooks.failed(err);
          reject(err);
        } else resolve(socket);
      };
      const timer = setTimeout(
        () =>
          finish(
            Object.assign(new Error(`${upstream.label}: no TLS connection within ${timeoutMs} ms`), {
              code: "UND_ERR_CONNECT_TIMEOUT",
            }),
          ),
        timeoutMs,
      );
      socket.on("session", (ticket: Buffer) => {
        if (verified) this.session = { ticket, peer: verified };
        else pending = ticket;
      });
      socket.once("secureConnect", () => {
        // A resumed session was verified when it was first made (sessions are only cached after
        // verification, per upstream and per identity generation); its certificate is not resent.
        const state =
          socket.isSessionReused() && offered
            ? classifyResumed(socket, offered.peer, upstream)
            : classifyOutbound(socket, upstream, this.trust);
        if (state.kind === "refused") {
          this.session = undefined;
          return finish(new PeerRefusedError(state));
        }
        verified = state.peer;
        if (pending) this.session = { ticket: pending, peer: verified };
        hooks.connected(socket, state, (performance.now() - started) / 1000);
        finish(null);
      });
      socket.once("error", (err) => finish(err));
    });
  }

  /** The same as an undici connector: HTTP/1.1 connections for a Pool. */
  undici(): buildConnector.connector {
    return (_options, callback) => {
      this.connect(["http/1.1"]).then(
        (socket) => callback(null, socket),
        (err: Error) => callback(err, null),
      );
    };
  }
}
