// Drives the simulator with the reference socket.io-client and prints one JSON report.
// usage: node client_check.mjs URL API_KEY
import { io } from "socket.io-client";

const [url, key] = process.argv.slice(2);
const report = {};
const timeout = setTimeout(() => { console.log(JSON.stringify({ ...report, timeout: true })); process.exit(2); }, 15000);

function connect(opts) {
  return new Promise((resolve) => {
    const s = io(url, { path: "/v1/socket", transports: ["websocket"], reconnection: false, ...opts });
    s.on("connect", () => resolve({ s, ok: true }));
    s.on("connect_error", (err) => { s.close(); resolve({ s, ok: false, message: err.message }); });
  });
}

const bad = await connect({ auth: { apiKey: "wrong" } });
report.badKey = { connected: bad.ok, message: bad.message };

const hdr = await connect({ extraHeaders: { "x-api-key": key } });
report.headerAuth = hdr.ok;
if (hdr.ok) hdr.s.close();

const { s, ok } = await connect({ auth: { apiKey: key } });
report.authConnected = ok;
report.subscribeTicker = await s.timeout(5000).emitWithAck("subscribe_ticker", [" btc/usd", "NOPE/USD"]);
report.subscribeEquity = await s.timeout(5000).emitWithAck("subscribe_equity", ["AAPL"]);
report.hostile = await s.timeout(5000).emitWithAck("subscribe_equity", "AAPL");
const tickers = await new Promise((resolve) => s.once("new_token_states", resolve));
const equities = await new Promise((resolve) => s.once("new_equity_states", resolve));
report.tickerState = tickers[0];
report.equityState = equities[0];
report.unsubscribe = await s.timeout(5000).emitWithAck("unsubscribe_ticker", ["BTC/USD"]);
s.close();
clearTimeout(timeout);
console.log(JSON.stringify(report));
process.exit(0);
