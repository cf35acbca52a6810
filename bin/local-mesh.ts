// The mesh of a mesh file, run on this machine without containers: the development CA and a
// certificate per service, then one stand-in app and one sidecar per service, each on its own
// loopback address, and each TCP server (redis-server, when installed) with its sidecar.
// `ashmesh up` runs it for people; `check`, `edges` and the tests run it too.
import { type ChildProcess, spawn } from "node:child_process";
import { createWriteStream, existsSync } from "node:fs";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { issueAll } from "../certs-dev/issue-all.js";
import { DevCa } from "../certs-dev/store.js";
import { type Standin, startStandinApp } from "../compose/standin.js";
import { parseConfig } from "../config/load.js";
import { localSidecarInput, localTcpSidecarInput, type Mesh, type MeshTcpServer } from "../config/mesh.js";
import type { ConfigInput } from "../config/schema.js";
import { createLogger } from "../proxy/log.js";
import { Sidecar } from "../proxy/sidecar.js";

/** compose/mesh.yaml of this package, from dist/bin or bin. */
export function defaultMeshFile(): string {
  for (const candidate of ["../../compose/mesh.yaml", "../compose/mesh.yaml"]) {
    const path = fileURLToPath(new URL(candidate, import.meta.url));
    if (existsSync(path)) return path;
  }
  return "compose/mesh.yaml";
}

/** Makes the CA and any missing certificate (issue-all); re-signs the CRLs so they are never stale at start. */
export async function ensurePki(mesh: Mesh, dir: string, say: (line: string) => void): Promise<DevCa> {
  await issueAll(mesh, dir, {}, (line) => {
    if (!line.startsWith("kept")) say(line);
  });
  const ca = DevCa.open(dir);
  await ca.writeCrl();
  return ca;
}

export interface LocalMesh {
  /** By key: the services' sidecars and the TCP servers'. */
  sidecars: Map<string, Sidecar>;
  /** Each TCP server: running, or why not (redis-server not installed). */
  servers: Map<string, { running: boolean; detail: string }>;
  /** Drains every sidecar, then stops the apps. */
  stop(): Promise<void>;
}

/**
 * Starts a sidecar and a stand-in app for every service, each on its own loopback address.
 * `adjust` may change one sidecar's configuration input (tests use it to break one on purpose).
 */
export async function startLocalMesh(
  mesh: Mesh,
  dir: string,
  options: { logDir: string; adjust?: (key: string, input: ConfigInput) => ConfigInput },
): Promise<LocalMesh> {
  const sidecars = new Map<string, Sidecar>();
  const servers = new Map<string, { running: boolean; detail: string }>();
  const apps: Standin[] = [];
  const processes: ChildProcess[] = [];
  const stop = async () => {
    await Promise.allSettled([...sidecars.values()].map((s) => s.drain()));
    for (const a of apps) a.close();
    await Promise.all(processes.map(stopProcess));
  };
  const startSidecar = async (key: string, serviceName: string, input: ConfigInput, first: boolean) => {
    const config = parseConfig(options.adjust ? options.adjust(key, input) : input, {
      source: `${mesh.file} (${key})`,
    });
    const logger = createLogger({
      service: serviceName,
      level: config.log.level,
      destination: createWriteStream(join(options.logDir, `${key}.log`), { flags: "a" }),
    });
    const sidecar = await Sidecar.create(config, { logger, processMetrics: first, inheritSockets: false });
    sidecars.set(key, sidecar);
    await sidecar.start();
  };
  try {
    for (const [i, s] of mesh.services.entries()) {
      await startSidecar(s.key, s.serviceName, localSidecarInput(mesh, s.key, dir), i === 0);
      const app = await startStandinApp({
        mesh,
        key: s.key,
        proxy: `http://${s.local}:${mesh.ports.outbound}`,
        host: s.local,
        port: s.appPort,
      });
      apps.push(app);
    }
    for (const server of mesh.tcp) {
      await startSidecar(server.key, server.serviceName, localTcpSidecarInput(mesh, server.key, dir), false);
      const started = await startTcpServer(server, options.logDir);
      if (started.process) processes.push(started.process);
      servers.set(server.key, { running: started.process !== null, detail: started.detail });
    }
  } catch (err) {
    await stop();
    const e = err as NodeJS.ErrnoException & { address?: string; port?: number };
    if (e.code === "EADDRINUSE") {
      throw new Error(`${e.address}:${e.port} is in use: is another \`ashmesh up\` running? Stop it first`);
    }
    if (e.code === "EADDRNOTAVAIL") {
      throw new Error(`cannot bind ${e.address}: this host does not route all of 127.0.0.0/8 to loopback`);
    }
    throw err;
  }
  return { sidecars, servers, stop };
}

/**
 * The server behind a TCP server's sidecar: redis-server on the server's own address, without
 * persistence, its log in LOGDIR/<key>-server.log. Not installed: null and a line saying so.
 */
async function startTcpServer(
  server: MeshTcpServer,
  logDir: string,
): Promise<{ process: ChildProcess | null; detail: string }> {
  const args = ["--bind", server.local, "--port", String(server.port), "--save", "", "--appendonly", "no"];
  const child = spawn("redis-server", [...args, "--dir", logDir], { stdio: ["ignore", "pipe", "pipe"] });
  const log = createWriteStream(join(logDir, `${server.key}-server.log`), { flags: "a" });
  child.stdout.pipe(log);
  child.stderr.pipe(log);
  return new Promise((resolve) => {
    let output = "";
    const fail = (detail: string) => {
      clearTimeout(timer);
      child.kill("SIGKILL");
      resolve({ process: null, detail });
    };
    const timer = setTimeout(
      () => fail(`redis-server did not start within 10 s (see ${server.key}-server.log)`),
      10_000,
    );
    const onError = (err: NodeJS.ErrnoException) =>
      fail(
        err.code === "ENOENT"
          ? "redis-server is not installed (apt-get install redis-server)"
          : `redis-server: ${err.message}`,
      );
    const onExit = (code: number | null) =>
      fail(`redis-server exited (${code}): ${output.trim().split("\n").at(-1) ?? ""}`);
    const onData = (d: Buffer) => {
      output += d.toString("utf8");
      if (!output.includes("Ready to accept connections")) return;
      clearTimeout(timer);
      child.off("exit", onExit);
      child.off("error", onError);
      child.on("error", () => undefined); // a failed kill later must not crash `up`
      child.stdout.off("data", onData);
      resolve({ process: child, detail: `redis-server on ${server.local}:${server.port}` });
    };
    child.once("error", onError);
    child.once("exit", onExit);
    child.stdout.on("data", onData);
  });
}

/** SIGTERM, then SIGKILL after 5 s; resolves when it exited. */
function stopProcess(child: ChildProcess): Promise<void> {
  if (child.exitCode !== null || child.signalCode !== null) return Promise.resolve();
  return new Promise((resolve) => {
    const timer = setTimeout(() => child.kill("SIGKILL"), 5_000);
    child.once("exit", () => {
      clearTimeout(timer);
      resolve();
    });
    child.kill("SIGTERM");
  });
}
