// The edges this sidecar has seen (like `linkerd viz edges`): who talked to whom, with which
// verified identities, over which TLS version. One record per (direction, peer), found once per
// connection or pool; a request only bumps its counters.
export interface Edge {
  direction: "inbound" | "outbound";
  src: string;
  dst: string;
  src_identity: string;
  dst_identity: string;
  tls_version: string;
  cipher_suite: string;
  requests: number;
  last_seen: string;
}

export interface EdgeCounter {
  hit(): void;
  /** The TLS version and cipher of the latest handshake on this edge. */
  tls(version: string, cipher: string): void;
}

type EdgeKey = Omit<Edge, "requests" | "last_seen" | "tls_version" | "cipher_suite">;

export class Edges {
  private readonly records = new Map<string, { edge: Edge; lastSeenMs: number }>();

  edge(fields: EdgeKey, tls?: { version: string; cipher: string }): EdgeCounter {
    const key = [fields.direction, fields.src, fields.dst, fields.src_identity, fields.dst_identity].join("\u0000");
    let record = this.records.get(key);
    if (!record) {
      if (this.records.size >= 10_000) this.records.clear(); // bounded even when peers churn
      record = {
        edge: { ...fields, tls_version: "unknown", cipher_suite: "unknown", requests: 0, last_seen: "" },
        lastSeenMs: 0,
      };
      this.records.set(key, record);
    }
    const r = record;
    if (tls) {
      r.edge.tls_version = tls.version;
      r.edge.cipher_suite = tls.cipher;
    }
    return {
      hit() {
        r.edge.requests++;
        r.lastSeenMs = Date.now();
      },
      tls(version, cipher) {
        r.edge.tls_version = version;
        r.edge.cipher_suite = cipher;
      },
    };
  }

  list(): Edge[] {
    return [...this.records.values()]
      .filter((r) => r.edge.requests > 0)
      .map((r) => ({ ...r.edge, last_seen: new Date(r.lastSeenMs).toISOString() }));
  }
}
