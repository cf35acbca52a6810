// What a reference pair (nginx.ts, haproxy.ts) is asked to do, as one typed plan: the ports of
// each hop and the certificates, chosen by contenders.ts before the proxies start (they take
// their ports from their config files). Each hop is the same production mTLS hop: plain in at the
// caller's proxy, TLS 1.3 with the caller's certificate to the callee's proxy, which requires a
// certificate from the mesh CA (CRL checked), lets the caller's identity alone through, sets
// x-forwarded-client-cert (HTTP) and hands over to the app or server behind it.

/** Certificate, key, mesh CA and CRL of one identity, as files. */
export interface TlsFiles {
  cert: string;
  key: string;
  ca: string;
  crl: string;
}

export interface Hop {
  /** Where the caller's proxy listens, plain, on 127.0.0.1. */
  outPort: number;
  /** Where the callee's proxy listens with mTLS, on 127.0.0.1. */
  inPort: number;
  /** The name the callee's certificate carries, verified by the caller's proxy. */
  peerName: string;
  callee: TlsFiles;
  /** What the callee's proxy hands over to: the app, the gRPC app, the Redis server. */
  targetPort: number;
}

export interface PairPlan {
  /** The temporary directory: pid files, temp paths, combined PEM files. */
  dir: string;
  caller: TlsFiles;
  /** The caller's identity (certificate CN): the only one the inbound lets through. */
  allow: string;
  /** Idle keep-alive connections each proxy keeps to its peer and to the app. */
  connections: number;
  /** HTTP/1.1 in, to the app's HTTP/1.1 port. */
  http: Hop;
  /** Cleartext HTTP/2 (prior knowledge) in at outPort, to `http`'s inbound and app. */
  h2?: { outPort: number };
  /** gRPC: cleartext HTTP/2 in, HTTP/2 over mTLS between the pair, h2c to the gRPC app. */
  grpc?: Hop;
  /** Plain TCP in, TLS between the pair, TCP to the server (Redis). */
  tcp?: Hop;
}

/** The caller's identity as a regular expression, for the allow-lists written as patterns. */
export function quotedName(name: string): string {
  return name.replaceAll(".", "\\.");
}
