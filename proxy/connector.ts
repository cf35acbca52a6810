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
import type { PeerIdentity } from "./policy.js";
import { classifyOutbound, classifyResumed, type Expected, PeerRefusedError, type Verified } from "./tls.js";

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

export function mtlsConnector(
  upstream: Upstream,
  context: SecureContext,
  trust: readonly X509Certificate[],
  hooks: ConnectorHooks,
  limits: Pick<Config["limits"], "connectTimeoutMs" | "tcpKeepAliveMs">,
): buildConnector.connector {
  const timeoutMs = limits.connectTimeoutMs;
  // The latest session of a verified server and the identity it proved. TLS 1.3 tickets may be
  // reused for full resumption (no early data is ever sent), so one is enough for the whole pool.
  let session: { ticket: Buffer; peer: PeerIdentity } | undefined;
  return (_options, callback) => {
    const started = performance.now();
    let settled = false;
    let verified: PeerIdentity | null = null;
    let pending: Buffer | undefined;
    const offered = session;
    const socket = tls.connect({
      host: upstream.host,
      port: upstream.port,
      servername: upstream.identity,
      secureContext: context,
      ...(offered ? { session: offered.ticket } : {}),
      // classifyOutbound decides below, so that a refusal carries its real reason and the names seen.
      rejectUnauthorized: false,
      checkServerIdentity: () => undefined,
      ALPNProtocols: ["http/1.1"],
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
        callback(err, null);
      } else {
        callback(null, socket);
      }
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
      if (verified) session = { ticket, peer: verified };
      else pending = ticket;
    });
    socket.once("secureConnect", () => {
      // A resumed session was verified when it was first made (sessions are only cached after
      // verification, per upstream and per identity generation); its certificate is not resent.
      const state =
        socket.isSessionReused() && offered
          ? classifyResumed(socket, offered.peer, upstream)
          : classifyOutbound(socket, upstream, trust);
      if (state.kind === "refused") {
        session = undefined;
        return finish(new PeerRefusedError(state));
      }
      verified = state.peer;
      if (pending) session = { ticket: pending, peer: verified };
      hooks.connected(socket, state, (performance.now() - started) / 1000);
      finish(null);
    });
    socket.once("error", (err) => finish(err));
  };
}
