// How outbound opens one mTLS connection to a peer, as an undici connector: TCP + TLS with our
// client context, the server verified by us (chain, identity, pin) before undici may send a byte,
// and a session cache that only ever holds sessions of servers that passed that verification.
// undici's own connector caches every session it sees, including one from a server we then
// refuse; and a resumed session carries no peer certificate on the client side (nodejs/node#35317),
// so a cache we do not control would be a way around the identity check.
import { createHash, type X509Certificate } from "node:crypto";
import tls, { type SecureContext, type TLSSocket } from "node:tls";
import type { buildConnector } from "undici";
import { parseSubjectAltName, rfc2253 } from "./policy.js";
import { refusalReason } from "./tls.js";

/** Where requests for one logical peer go, and what its certificate must say. */
export interface Upstream {
  /** The identity the server's certificate must carry (a DNS or URI SAN). */
  identity: string;
  /** Where to connect: the peer's name, or a `resolve` override. */
  host: string;
  port: number;
  /** "sha256//<base64 SPKI>" or null. */
  pin: string | null;
  /** "auth.ashchan.local:8443", for messages and the edges list. */
  label: string;
}

function refuse(code: string, message: string): Error {
  return Object.assign(new Error(message), { code });
}

/**
 * Whether a server that completed a full handshake is the one the request is meant for: the
 * chain verified (CA bundle and CRL), an exact DNS or URI SAN equal to the expected identity
 * (never a wildcard), and the SPKI pin when one is set. Returns the refusal, or null.
 */
export function verifyServer(socket: TLSSocket, upstream: Upstream, trust: readonly X509Certificate[]): Error | null {
  const cert = socket.getPeerX509Certificate();
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

export interface ConnectorHooks {
  /** A verified connection: handshake time, and whether the session was resumed. */
  connected(socket: TLSSocket, seconds: number): void;
  /** A TLS or network failure, before undici sees it. */
  failed(err: Error): void;
}

export function mtlsConnector(
  upstream: Upstream,
  context: SecureContext,
  trust: readonly X509Certificate[],
  hooks: ConnectorHooks,
  timeoutMs: number,
): buildConnector.connector {
  // The latest session of a verified server. TLS 1.3 tickets may be reused for full resumption
  // (no early data is ever sent), so one is enough for the whole pool.
  let session: Buffer | undefined;
  return (_options, callback) => {
    const started = performance.now();
    let settled = false;
    let verified = false;
    let pending: Buffer | undefined;
    const socket = tls.connect({
      host: upstream.host,
      port: upstream.port,
      servername: upstream.identity,
      secureContext: context,
      ...(session ? { session } : {}),
      // verifyServer decides below, so that a refusal carries its real reason and the names seen.
      rejectUnauthorized: false,
      checkServerIdentity: () => undefined,
      ALPNProtocols: ["http/1.1"],
    });
    socket.setNoDelay(true);
    socket.setKeepAlive(true, 60_000);
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
      () => finish(refuse("UND_ERR_CONNECT_TIMEOUT", `${upstream.label}: no TLS connection within ${timeoutMs} ms`)),
      timeoutMs,
    );
    socket.on("session", (ticket: Buffer) => {
      if (verified) session = ticket;
      else pending = ticket;
    });
    socket.once("secureConnect", () => {
      // A resumed session was verified when it was first made (sessions are only cached after
      // verification, per upstream and per identity generation); its certificate is not resent.
      const refusal = socket.isSessionReused()
        ? socket.authorized
          ? null
          : refuse(String(socket.authorizationError ?? "UNKNOWN"), `${upstream.label}: resumed session not authorized`)
        : verifyServer(socket, upstream, trust);
      if (refusal) {
        session = undefined;
        return finish(refusal);
      }
      verified = true;
      if (pending) session = pending;
      hooks.connected(socket, (performance.now() - started) / 1000);
      finish(null);
    });
    socket.once("error", (err) => finish(err));
  };
}
