// The mesh of a mesh file, run on this machine without containers: the development CA and a
// certificate per service, then one stand-in app and one sidecar per service, each on its own
// loopback address. `ashmesh up` runs it for people; `check`, `edges` and the tests run it too.
import { createWriteStream, existsSync } from "node:fs";
import type http from "node:http";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { issueAll } from "../certs-dev/issue-all.js";
import { DevCa } from "../certs-dev/store.js";
import { startStandinApp } from "../compose/standin.js";
import { parseConfig } from "../config/load.js";
import { localSidecarInput, type Mesh } from "../config/mesh.js";
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
  sidecars: Map<string, Sidecar>;
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
  const apps: http.Server[] = [];
  const stop = async () => {
    await Promise.allSettled([...sidecars.values()].map((s) => s.drain()));
    for (const a of apps) {
      a.closeAllConnections();
      a.close();
    }
  };
  try {
    for (const [i, s] of mesh.services.entries()) {
      const input = localSidecarInput(mesh, s.key, dir);
      const config = parseConfig(options.adjust ? options.adjust(s.key, input) : input, {
        source: `${mesh.file} (${s.key})`,
      });
      const logger = createLogger({
        service: s.serviceName,
        level: config.log.level,
        destination: createWriteStream(join(options.logDir, `${s.key}.log`), { flags: "a" }),
      });
      const sidecar = await Sidecar.create(config, { logger, processMetrics: i === 0, inheritSockets: false });
      sidecars.set(s.key, sidecar);
      await sidecar.start();
      const { server } = await startStandinApp({
        mesh,
        key: s.key,
        proxy: `http://${s.local}:${mesh.ports.outbound}`,
        host: s.local,
        port: s.appPort,
      });
      apps.push(server);
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
  return { sidecars, stop };
}
