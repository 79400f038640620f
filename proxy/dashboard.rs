//! The admin dashboard: one self-contained HTML page (no external assets) that polls
//! `/status` every two seconds and draws pools, backends, listeners and recent changes.

pub const HTML: &str = r##"<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>fulcrum</title>
<style>
  :root { --bg:#0f1419; --panel:#171e26; --line:#263240; --text:#d8e0e8; --dim:#7d8b99;
          --ok:#3fb950; --bad:#f85149; --warn:#d29922; --accent:#58a6ff; }
  * { box-sizing: border-box; }
  body { margin:0; background:var(--bg); color:var(--text);
         font:14px/1.45 -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; }
  header { display:flex; align-items:center; gap:18px; padding:14px 24px;
           border-bottom:1px solid var(--line); background:#121920; position:sticky; top:0; }
  header h1 { font-size:18px; margin:0; letter-spacing:.5px; }
  header h1 span { color:var(--accent); }
  .chip { padding:3px 10px; border-radius:999px; background:var(--panel); border:1px solid var(--line);
          color:var(--dim); font-size:12px; }
  .chip b { color:var(--text); font-weight:600; }
  main { padding:20px 24px; display:grid; gap:18px; }
  .pool { background:var(--panel); border:1px solid var(--line); border-radius:10px; overflow:hidden; }
  .pool-head { display:flex; align-items:baseline; gap:14px; padding:12px 16px; border-bottom:1px solid var(--line); }
  .pool-head h2 { margin:0; font-size:16px; }
  .pool-head .meta { color:var(--dim); font-size:12px; }
  .pool-head .rps { margin-left:auto; font-variant-numeric:tabular-nums; }
  table { width:100%; border-collapse:collapse; font-variant-numeric:tabular-nums; }
  th { text-align:left; font-weight:500; color:var(--dim); font-size:12px; padding:8px 16px;
       border-bottom:1px solid var(--line); }
  td { padding:8px 16px; border-bottom:1px solid #1d2630; white-space:nowrap; }
  tr:last-child td { border-bottom:none; }
  .dot { display:inline-block; width:9px; height:9px; border-radius:50%; margin-right:8px; }
  .up { background:var(--ok); box-shadow:0 0 6px var(--ok); }
  .down { background:var(--bad); box-shadow:0 0 6px var(--bad); }
  .draining { background:var(--warn); box-shadow:0 0 6px var(--warn); }
  .tag { font-size:11px; padding:1px 7px; border-radius:4px; border:1px solid var(--line); color:var(--dim); }
  .tag.open { color:var(--bad); border-color:var(--bad); }
  .tag.half_open { color:var(--warn); border-color:var(--warn); }
  .tag.panic { color:var(--warn); border-color:var(--warn); }
  .bar { position:relative; height:8px; width:120px; background:#0d1217; border-radius:4px; overflow:hidden; }
  .bar i { position:absolute; left:0; top:0; bottom:0; background:linear-gradient(90deg,#1f6feb,#58a6ff); }
  svg.spark { width:120px; height:26px; display:block; }
  .num { text-align:right; }
  .two { display:grid; grid-template-columns: 1fr 2fr; gap:18px; }
  .box { background:var(--panel); border:1px solid var(--line); border-radius:10px; padding:12px 16px; }
  .box h3 { margin:0 0 8px; font-size:13px; color:var(--dim); font-weight:500; text-transform:uppercase; letter-spacing:.6px; }
  .hist div { padding:4px 0; border-bottom:1px solid #1d2630; font-size:13px; }
  .hist .t { color:var(--dim); margin-right:8px; font-variant-numeric:tabular-nums; }
  .hist .bad { color:var(--bad); }
  #err { color:var(--bad); }
  @media (max-width: 900px) { .two { grid-template-columns: 1fr; } }
</style>
</head>
<body>
<header>
  <h1>ful<span>crum</span></h1>
  <span class="chip">generation <b id="gen">–</b></span>
  <span class="chip">total <b id="total">–</b> req/s</span>
  <span class="chip">changes <b id="changes">–</b></span>
  <span class="chip" id="state">–</span>
  <span id="err"></span>
</header>
<main>
  <div id="pools"></div>
  <div class="two">
    <div class="box"><h3>Listeners</h3><div id="listeners"></div></div>
    <div class="box"><h3>Recent changes</h3><div class="hist" id="history"></div></div>
  </div>
</main>
<script>
const prev = {}, series = {};
let lastAt = 0;
const esc = s => String(s).replace(/[&<>"']/g, c => ({'&':'&amp;','<':'&lt;','>':'&gt;','"':'&quot;',"'":'&#39;'}[c]));
const fmt = n => n >= 1000 ? (n/1000).toFixed(1) + 'k' : n.toFixed(n < 10 ? 1 : 0);
function spark(points) {
  if (!points || points.length < 2) return '<svg class="spark"></svg>';
  const max = Math.max(1, ...points), w = 120, h = 26;
  const d = points.map((v, i) => `${(i / (points.length - 1) * w).toFixed(1)},${(h - 2 - v / max * (h - 4)).toFixed(1)}`).join(' ');
  return `<svg class="spark" viewBox="0 0 ${w} ${h}"><polyline fill="none" stroke="#58a6ff" stroke-width="1.5" points="${d}"/></svg>`;
}
function render(s) {
  const now = performance.now(), dt = lastAt ? (now - lastAt) / 1000 : 0;
  lastAt = now;
  let total = 0;
  document.getElementById('gen').textContent = s.generation;
  document.getElementById('changes').textContent = `${s.changes.applied} applied, ${s.changes.rejected} rejected`;
  const st = document.getElementById('state');
  st.innerHTML = s.draining ? '<b style="color:var(--warn)">draining</b>' : '<b style="color:var(--ok)">serving</b>';
  const pools = s.pools.map(p => {
    let poolRps = 0;
    const rows = p.backends.map(b => {
      const key = p.name + '|' + b.id;
      const rps = dt && prev[key] !== undefined ? Math.max(0, (b.requests - prev[key]) / dt) : 0;
      prev[key] = b.requests;
      (series[key] = series[key] || []).push(rps);
      if (series[key].length > 60) series[key].shift();
      poolRps += rps;
      return {b, rps, key};
    });
    total += poolRps;
    const body = rows.map(({b, rps, key}) => {
      const cls = b.draining ? 'draining' : (b.healthy ? 'up' : 'down');
      const label = b.draining ? 'draining' : (b.healthy ? 'up' : 'down');
      const share = poolRps > 0 ? rps / poolRps * 100 : 0;
      const w = b.weight === b.effective_weight ? b.weight : `${b.effective_weight}/${b.weight}`;
      return `<tr>
        <td><span class="dot ${cls}"></span>${esc(b.address)}${b.spec !== b.address ? ` <span class="tag">${esc(b.spec)}</span>` : ''}</td>
        <td>${label}</td>
        <td><span class="tag ${esc(b.breaker)}">${esc(b.breaker.replace('_', '-'))}</span></td>
        <td class="num">${w}</td>
        <td class="num">${b.in_flight}${b.sessions ? ` <span class="tag">${b.sessions} ws</span>` : ''}</td>
        <td class="num">${fmt(rps)}</td>
        <td><div class="bar"><i style="width:${share.toFixed(1)}%"></i></div></td>
        <td>${spark(series[key])}</td>
        <td class="num">${b.latency_ms.p50.toFixed(2)}</td>
        <td class="num">${b.latency_ms.p99.toFixed(2)}</td>
        <td class="num">${b.requests}</td>
        <td class="num">${b.failures}</td>
      </tr>`;
    }).join('');
    return `<section class="pool">
      <div class="pool-head"><h2>${esc(p.name)}</h2>
        <span class="meta">${esc(p.algorithm.replace(/_/g, ' '))} · ${p.backends.length} backends</span>
        ${p.panic ? '<span class="tag panic">panic mode</span>' : ''}
        <span class="rps"><b>${fmt(poolRps)}</b> req/s</span></div>
      <table><thead><tr><th>backend</th><th>state</th><th>breaker</th><th class="num">weight</th>
        <th class="num">in flight</th><th class="num">req/s</th><th>share</th><th>last 2 min</th>
        <th class="num">p50 ms</th><th class="num">p99 ms</th><th class="num">requests</th><th class="num">failures</th></tr></thead>
      <tbody>${body || '<tr><td colspan="12" style="color:var(--dim)">no backends</td></tr>'}</tbody></table>
    </section>`;
  }).join('');
  document.getElementById('pools').innerHTML = pools;
  document.getElementById('total').textContent = fmt(total);
  document.getElementById('listeners').innerHTML = s.listeners.map(l =>
    `<div><span class="dot up"></span><b>${esc(l.name)}</b> <span class="tag">${esc(l.address)}</span></div>`).join('');
  document.getElementById('history').innerHTML = s.history.slice().reverse().slice(0, 12).map(h =>
    `<div class="${h.ok ? '' : 'bad'}"><span class="t">${new Date(h.at * 1000).toLocaleTimeString()}</span>${esc(h.summary)}</div>`
  ).join('') || '<div style="color:var(--dim)">none yet</div>';
}
async function tick() {
  try {
    const r = await fetch('status', {cache: 'no-store', credentials: 'same-origin'});
    if (!r.ok) throw new Error('status ' + r.status);
    render(await r.json());
    document.getElementById('err').textContent = '';
  } catch (e) {
    document.getElementById('err').textContent = 'cannot reach fulcrum: ' + e.message;
  }
}
tick();
setInterval(tick, 2000);
</script>
</body>
</html>
"##;
