// `workers: N | auto`: one sidecar as N processes sharing its listeners (node:cluster; the primary
// accepts and hands each connection to a worker in turn). The primary keeps what must happen once:
// the admin listener (metrics aggregated over every process, /status and /edges of all of them),
// the ACME manager and the CRL fetcher (they only write files) and the signals. Each worker is a
// whole data plane: its own listeners' connections, pools, identity store and file watcher, so
// reloads and revocations reach every worker the way they reach a single process. SIGHUP is passed
// on; SIGTERM drains every worker, then the primary exits 0. A worker that dies is replaced.
import cluster, { type Worker } from "node:cluster";
import { randomUUID } from "node:crypto";
import { availableParallelism } from "node:os";
import { AggregatorRegistry, type MetricObjectWithValues, type MetricValue } from "prom-client";
import type { Config } from "../config/schema.js";
import type { ChallengeChange } from "./acme-challenge.js";
import type { Edge } from "./edges.js";
import type { Logger } from "./log.js";
import { Sidecar } from "./sidecar.js";
import { inheritedSockets, type ListenerName } from "./systemd.js";

/** How many processes `workers` asks for. */
export function workerCount(workers: Config["workers"]): number {
  return workers === "auto" ? availableParallelism() : workers;
}

/** Messages between the primary and its workers (each carries `ashmesh` to tell them from others). */
type ToWorker =
  | { ashmesh: "ask"; id: string; what: "status" | "edges" | "metrics" }
  | { ashmesh: "reload" }
  | { ashmesh: "drain" }
  | { ashmesh: "challenge"; change: ChallengeChange };
type ToPrimary = { ashmesh: "ready" } | { ashmesh: "answer"; id: string; value: unknown };

const ASK_TIMEOUT_MS = 5_000;
/** A worker that dies this soon after it started counts towards a crash loop. */
const EARLY_DEATH_MS = 10_000;
const MAX_EARLY_DEATHS = 5;
/** The listening sockets systemd handed to the primary, passed on to its workers by number. */
const SOCKETS_ENV = "ASHMESH_LISTEN_FDS";

/** The primary: admin, ACME, CRL fetching, signals; forks and watches `count` workers. */
export async function runPrimary(config: Config, count: number): Promise<number> {
  const sockets = inheritedSockets();
  const workers = new Map<Worker, { ready: boolean; startedAt: number }>();
  const pending = new Map<string, { answers: unknown[]; expected: number; resolve: (v: unknown[]) => void }>();
  let draining = false;
  let earlyDeaths = 0;

  const ask = (what: "status" | "edges" | "metrics"): Promise<unknown[]> => {
    const alive = [...workers.keys()].filter((w) => w.isConnected());
    if (alive.length === 0) return Promise.resolve([]);
    const id = randomUUID();
    return new Promise((resolve) => {
      const timer = setTimeout(() => {
        const p = pending.get(id);
        pending.delete(id);
        resolve(p?.answers ?? []); // a worker that does not answer is left out, not waited for
      }, ASK_TIMEOUT_MS);
      pending.set(id, {
        answers: [],
        expected: alive.length,
        resolve: (answers) => {
          clearTimeout(timer);
          resolve(answers);
        },
      });
      for (const w of alive) w.send({ ashmesh: "ask", id, what } satisfies ToWorker);
    });
  };

  // The primary's own sidecar has no data listeners: its admin answers for everyone.
  const primary = await Sidecar.create(
    {
      ...config,
      inbound: { ...config.inbound, enabled: false },
      outbound: { ...config.outbound, enabled: false },
      tcp: { inbound: [], outbound: [] },
    },
    {
      sockets: new Map([...sockets].filter(([name]) => name === "admin")),
      admin: {
        registry: {
          get contentType() {
            return primary.metrics.registry.contentType;
          },
          metrics: async () => {
            const own = await primary.metrics.registry.getMetricsAsJSON();
            const theirs = (await ask("metrics")) as Array<Array<MetricObjectWithValues<MetricValue<string>>>>;
            return AggregatorRegistry.aggregate([own, ...theirs]).metrics();
          },
        },
        ready: () => {
          if (draining) return { ready: false, reason: "draining" };
          const waiting = [...workers.values()].filter((w) => !w.ready).length;
          if (workers.size < count || waiting > 0)
            return { ready: false, reason: `${count - workers.size + waiting} of ${count} workers not ready` };
          return { ready: true };
        },
        status: async () => mergeStatus(primary.status(), (await ask("status")) as WorkerStatus[]),
        edges: async () => mergeEdges((await ask("edges")) as Edge[][]),
      },
    },
  );
  const logger = primary.logger;
  // Challenges the ACME manager sets up here are answered by whichever worker the CA reaches.
  const challenges = primary.challenges;
  if (challenges) {
    challenges.onChange = (change) => {
      for (const w of workers.keys()) if (w.isConnected()) w.send({ ashmesh: "challenge", change } satisfies ToWorker);
    };
  }

  cluster.setupPrimary({ silent: false });
  const fork = () => {
    const worker = cluster.fork({
      [SOCKETS_ENV]: [...sockets].map(([name, fd]) => `${name}:${fd}`).join(","),
    });
    workers.set(worker, { ready: false, startedAt: Date.now() });
    worker.on("message", (message: ToPrimary) => {
      if (message?.ashmesh === "ready") {
        const w = workers.get(worker);
        if (w) w.ready = true;
      } else if (message?.ashmesh === "answer") {
        const p = pending.get(message.id);
        if (!p) return;
        p.answers.push(message.value);
        if (p.answers.length >= p.expected) {
          pending.delete(message.id);
          p.resolve(p.answers);
        }
      }
    });
    return worker;
  };

  await primary.start();
  for (let i = 0; i < count; i++) fork();
  logger.info({ event: "workers_started", workers: count });

  const exited = new Promise<number>((resolveExit) => {
    cluster.on("exit", (worker, code, signal) => {
      const w = workers.get(worker);
      workers.delete(worker);
      if (draining) {
        if (workers.size === 0) resolveExit(0);
        return;
      }
      logger.error({ event: "worker_exited", pid: worker.process.pid, code, signal, message: "starting another" });
      if (w && Date.now() - w.startedAt < EARLY_DEATH_MS && ++earlyDeaths >= MAX_EARLY_DEATHS) {
        logger.fatal({
          event: "worker_exited",
          message: `${earlyDeaths} workers died right after starting: giving up`,
        });
        draining = true;
        for (const other of workers.keys()) other.kill("SIGKILL");
        resolveExit(1);
        return;
      }
      fork();
    });
  });

  process.on("SIGHUP", () => {
    logger.info({ event: "signal", signal: "SIGHUP" });
    void primary.reload("SIGHUP");
    for (const w of workers.keys()) if (w.isConnected()) w.send({ ashmesh: "reload" } satisfies ToWorker);
  });
  const signal = await Promise.race([
    new Promise<string>((resolve) => {
      process.once("SIGTERM", () => resolve("SIGTERM"));
      process.once("SIGINT", () => resolve("SIGINT"));
    }),
    exited.then(() => "crash loop"),
  ]);
  if (signal === "crash loop") {
    await primary.stop();
    return 1;
  }
  logger.info({ event: "signal", signal });
  logger.info({ event: "draining", timeout_ms: config.limits.drainTimeoutMs, workers: workers.size });
  draining = true;
  const done = workers.size === 0 ? Promise.resolve(0) : exited;
  for (const w of workers.keys()) if (w.isConnected()) w.send({ ashmesh: "drain" } satisfies ToWorker);
  // Each worker drains within limits.drainTimeoutMs; one that hangs past that and a grace is killed.
  const deadline = setTimeout(() => {
    for (const w of workers.keys()) w.kill("SIGKILL");
  }, config.limits.drainTimeoutMs + 5_000);
  deadline.unref();
  const code = await done;
  clearTimeout(deadline);
  await primary.stop();
  return code;
}

/** A worker: the data plane, answering the primary's questions and taking its signals. */
export async function runWorker(config: Config, logger: Logger): Promise<number> {
  const sockets = new Map<ListenerName, number>();
  for (const entry of (process.env[SOCKETS_ENV] ?? "").split(",").filter(Boolean)) {
    const [name, fd] = entry.split(":");
    if (name === "inbound" || name === "outbound") sockets.set(name, Number(fd));
  }
  const sidecar = await Sidecar.create(
    { ...config, admin: { ...config.admin, enabled: false } },
    { logger, control: false, sockets, processMetrics: true },
  );
  await sidecar.start();
  const send = (message: ToPrimary) => process.send?.(message);
  let draining: Promise<void> | null = null;
  const drain = () => {
    draining ??= sidecar.drain();
    return draining;
  };
  process.on("message", (message: ToWorker) => {
    switch (message?.ashmesh) {
      case "ask": {
        const value =
          message.what === "status"
            ? { pid: process.pid, ...(sidecar.status() as object) }
            : message.what === "edges"
              ? sidecar.edges.list()
              : null;
        if (message.what === "metrics") {
          void sidecar.metrics.registry
            .getMetricsAsJSON()
            .then((json) => send({ ashmesh: "answer", id: message.id, value: json }));
        } else send({ ashmesh: "answer", id: message.id, value });
        return;
      }
      case "reload":
        void sidecar.reload("SIGHUP");
        return;
      case "challenge":
        sidecar.challenges?.apply(message.change);
        return;
      case "drain":
        void drain().then(() => process.exit(0));
        return;
    }
  });
  // Signals go to the primary (systemd's KillMode=mixed, a terminal's Ctrl-C reaches the group):
  // a worker waits for the primary's word, and drains by itself if the primary is gone.
  process.on("SIGTERM", () => undefined);
  process.on("SIGINT", () => undefined);
  process.on("disconnect", () => void drain().then(() => process.exit(0)));
  send({ ashmesh: "ready" });
  return new Promise<number>(() => undefined); // runs until drained (process.exit above)
}

interface WorkerStatus {
  pid: number;
  state: string;
  listeners: unknown;
  open_connections: Record<string, number>;
}

/** The primary's /status (identity, ACME, reloads) with every worker's listeners and connections. */
function mergeStatus(primary: unknown, workers: WorkerStatus[]): unknown {
  const sum: Record<string, number> = {};
  for (const w of workers) for (const [k, v] of Object.entries(w.open_connections ?? {})) sum[k] = (sum[k] ?? 0) + v;
  const first = workers[0];
  return {
    ...(primary as object),
    state: (primary as { state?: string }).state,
    listeners: first?.listeners ?? (primary as { listeners?: unknown }).listeners,
    open_connections: sum,
    workers: workers.map((w) => ({ pid: w.pid, state: w.state, open_connections: w.open_connections })),
  };
}

/** One row per edge over every worker: requests added up, the latest last_seen. */
function mergeEdges(lists: Edge[][]): Edge[] {
  const rows = new Map<string, Edge>();
  for (const edge of lists.flat()) {
    const key = [edge.direction, edge.src, edge.dst, edge.src_identity, edge.dst_identity].join("\u0000");
    const row = rows.get(key);
    if (!row) rows.set(key, { ...edge });
    else {
      row.requests += edge.requests;
      if (edge.last_seen > row.last_seen) row.last_seen = edge.last_seen;
    }
  }
  return [...rows.values()];
}
