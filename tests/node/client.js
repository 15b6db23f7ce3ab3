// Calls the health service for every CabinCrew service and one CabinCrew RPC, using
// stubs built at run time from proto/ by @grpc/proto-loader. Prints one JSON line.
const path = require("path");
const grpc = require("@grpc/grpc-js");
const loader = require("@grpc/proto-loader");

const [address, token] = process.argv.slice(2);
const root = path.resolve(__dirname, "..", "..", "proto");
const opts = { keepCase: true, longs: String, enums: String, defaults: true, includeDirs: [root, __dirname] };
const health = grpc.loadPackageDefinition(loader.loadSync("health.proto", opts)).grpc.health.v1;
const cabincrew = grpc.loadPackageDefinition(
  loader.loadSync(["cabincrew/v1/audit.proto", "cabincrew/v1/orchestrator.proto"], opts)
).cabincrew.v1;

const services = [
  "cabincrew.v1.AuditService", "cabincrew.v1.PreflightService", "cabincrew.v1.ApprovalService",
  "cabincrew.v1.OrchestratorService", "cabincrew.v1.McpGatewayService", "cabincrew.v1.LlmGatewayService",
];
const deadline = () => new Date(Date.now() + 5000);

async function main() {
  const client = new health.Health(address, grpc.credentials.createInsecure());
  const result = { health: {} };
  for (const service of services) {
    result.health[service] = await new Promise((resolve, reject) =>
      client.Check({ service }, { deadline: deadline() }, (err, res) => (err ? reject(err) : resolve(res.status)))
    );
  }
  const audit = new cabincrew.AuditService(address, grpc.credentials.createInsecure());
  const md = new grpc.Metadata();
  if (token) md.add("authorization", `Bearer ${token}`);
  result.checkpoint = await new Promise((resolve) =>
    audit.GetCheckpoint({}, md, { deadline: deadline() }, (err, res) =>
      resolve(err ? { code: err.code } : { code: 0, tree_size: res.tree_size })
    )
  );
  console.log(JSON.stringify(result));
}

main().catch((err) => { console.error(String(err)); process.exit(1); });
