// ISH Gateway status page: redraws <main id="content"> from GET /admin/overview every refresh_s seconds.
// The server renders the same page first (it works without JavaScript); this only keeps it fresh.
// DOM built with createElement/textContent only: nothing from the JSON is parsed as HTML.
"use strict";
(function () {
  var SVG = "http://www.w3.org/2000/svg";

  function h(tag, attrs, children) {
    var el = document.createElement(tag);
    var k;
    for (k in attrs || {}) { el.setAttribute(k, attrs[k]); }
    (children || []).forEach(function (c) {
      el.appendChild(typeof c === "string" || typeof c === "number" ? document.createTextNode(String(c)) : c);
    });
    return el;
  }
  function dash(v) { return v === null || v === undefined ? "\u2013" : String(v); }

  function spark(sp) {
    if (!sp) { return h("span", { "class": "muted" }, ["no traffic"]); }
    var svg = document.createElementNS(SVG, "svg");
    svg.setAttribute("class", "spark");
    svg.setAttribute("viewBox", "0 0 120 28");
    svg.setAttribute("width", "120");
    svg.setAttribute("height", "28");
    svg.setAttribute("role", "img");
    svg.setAttribute("aria-label", "p50 and p95 latency, top " + sp.top_ms + " ms");
    ["p95", "p50"].forEach(function (name) {
      var path = document.createElementNS(SVG, "path");
      path.setAttribute("class", name);
      path.setAttribute("d", sp[name]);
      svg.appendChild(path);
    });
    return svg;
  }

  function tile(bad, value, key, label) {
    return h("div", { "class": "tile" + (bad ? " bad" : "") }, [h("span", { "class": "n", "data-k": key }, [value]), " " + label]);
  }

  function summary(page) {
    var s = page.summary, u = page.usage_today, tiles = [
      tile(s.pools_down, (s.pools - s.pools_down) + "/" + s.pools, "pools", "pools serving"),
      tile(s.instances_out, (s.instances - s.instances_out) + "/" + s.instances, "instances", "instances in"),
      tile(false, s.rps, "rps", "requests/s")
    ];
    if (u) {
      tiles.push(tile(false, u.total_tokens, "tokens", "tokens today"));
      tiles.push(tile(false, "$" + Number(u.cost_usd).toFixed(4), "cost", "cost today"));
    } else {
      var t = tile(false, "\u2013", "tokens", "tokens today (no usage rows)");
      t.className += " muted";
      tiles.push(t);
    }
    tiles.push(tile(s.last_reload_ok === false, s.reloads, "reloads", "reloads, " + s.reload_failures + " failed"));
    return h("section", { "class": "tiles", id: "summary" }, tiles);
  }

  function instanceRow(row) {
    var breaker = row.breaker + (row.breaker_reason && row.breaker !== "closed" ? " (" + row.breaker_reason + ")" : "");
    return h("tr", { "class": row.role, "data-instance": row.name }, [
      h("td", { "class": "name" }, [row.name]),
      h("td", { "class": "state" }, [h("span", { "class": "badge " + row.role }, [row.role === "primary" ? "in" : row.role])]),
      h("td", { "class": "reason" }, [row.reason || ""]),
      h("td", { "class": "health" }, [row.health]),
      h("td", { "class": "breaker" }, [breaker]),
      h("td", { "class": "num" }, [row.rps]),
      h("td", { "class": "num" }, [dash(row.p50_ms)]),
      h("td", { "class": "num" }, [dash(row.p95_ms)]),
      h("td", {}, [spark(row.spark)])
    ]);
  }

  function pool(p) {
    var title = h("h3", {}, [p.model + " ", h("small", {}, [p.family + " " + p.kind + " \u00b7 " + p.strategy + " \u00b7 " + p.name])]);
    if (!p.available) { title.appendChild(h("span", { "class": "badge out" }, ["no instance"])); }
    var head = h("tr", {}, ["instance", "state", "why out", "health", "breaker", "req/s", "p50 ms", "p95 ms", "latency"].map(function (t) { return h("th", {}, [t]); }));
    return h("article", { "class": "pool" + (p.available ? "" : " down"), "data-pool": p.name }, [
      title,
      h("p", { "class": "figures" }, [p.rps + " req/s \u00b7 p50 " + dash(p.p50_ms) + " ms \u00b7 p95 " + dash(p.p95_ms) + " ms", spark(p.spark)]),
      h("table", {}, [h("thead", {}, [head]), h("tbody", {}, p.instances.map(instanceRow))])
    ]);
  }

  function pools(page) {
    var items = [h("h2", {}, ["Pools ", h("small", {}, ["p50 / p95 over the last " + page.window_minutes + " minutes"])])];
    if (!page.pools.length) { items.push(h("p", { "class": "muted" }, ["No pools: add an instance (POST /admin/instances)."])); }
    return h("section", { id: "pools" }, items.concat(page.pools.map(pool)));
  }

  function scalingGroup(g) {
    var title = [g.name + " ", h("small", {}, [g.models.join(", ") + " \u00b7 min " + g.min + " \u00b7 max " + g.max]), " ",
      h("span", { "class": "badge" + (g.current < g.desired ? " out" : "") }, [g.current + "/" + g.desired + " serving/desired"])];
    if (g.starting) { title.push(" ", h("span", { "class": "badge backup" }, [g.starting + " starting"])); }
    var items = [h("h3", {}, title), h("p", { "class": "figures" }, [g.evaluation])];
    if (!g.events.length) {
      items.push(h("p", { "class": "muted" }, ["No scaling event yet."]));
    } else {
      var head = h("tr", {}, ["at", "direction", "count", "instance", "outcome", "s", "why"].map(function (t) { return h("th", {}, [t]); }));
      items.push(h("table", {}, [h("thead", {}, [head]), h("tbody", {}, g.events.map(function (e) {
        return h("tr", { "class": e.outcome === "ok" ? "ok" : "failed" }, [
          h("td", {}, [String(e.at || "").slice(0, 19).replace("T", " ")]), h("td", {}, [e.direction || ""]), h("td", {}, [e.counts]),
          h("td", {}, [e.instance || ""]), h("td", {}, [e.outcome || ""]), h("td", { "class": "num" }, [dash(e.duration_s)]),
          h("td", { "class": "reason" }, [e.why])
        ]);
      }))]));
    }
    return h("article", { "class": "group", "data-group": g.name }, items);
  }

  function scaling(page) {
    var items = [h("h2", {}, ["Scaling groups"])];
    if (!page.scaling.length) { items.push(h("p", { "class": "muted" }, ["No scaling group (POST /admin/scaling/groups)."])); }
    return h("section", { id: "scaling" }, items.concat(page.scaling.map(scalingGroup)));
  }

  function reloads(page) {
    var items = [h("h2", {}, ["Last reloads"])];
    if (!page.reloads.length) {
      items.push(h("p", { "class": "muted" }, ["No reload since the controller started."]));
    } else {
      var head = h("tr", {}, ["at", "outcome", "generation", "ms", "error"].map(function (t) { return h("th", {}, [t]); }));
      items.push(h("table", {}, [h("thead", {}, [head]), h("tbody", {}, page.reloads.map(function (r) {
        return h("tr", { "class": r.ok ? "ok" : "failed" }, [
          h("td", {}, [String(r.at || "").slice(0, 19).replace("T", " ")]), h("td", {}, [r.ok ? "ok" : "failed"]), h("td", { "class": "num" }, [dash(r.generation)]),
          h("td", { "class": "num" }, [dash(r.duration_ms)]), h("td", { "class": "reason" }, [r.error || ""])
        ]);
      }))]));
    }
    return h("section", { id: "reloads" }, items);
  }

  function alerts(page) {
    var items = [h("h2", {}, ["Recent alerts"])];
    if (page.alerts === null) {
      items.push(h("p", { "class": "muted" }, ["This controller keeps no alerts."]));
    } else if (!page.alerts.length) {
      items.push(h("p", { "class": "muted" }, ["No alert."]));
    } else {
      items.push(h("ul", {}, page.alerts.map(function (a) {
        return h("li", { "class": a.state || "" }, [(a.at || "") + " " + (a.subject || a.text || a.event || "")]);
      })));
    }
    return h("section", { id: "alerts" }, items);
  }

  function draw(page) {
    var main = document.getElementById("content");
    var sections = [summary(page), pools(page)];
    if (page.scaling !== null && page.scaling !== undefined) { sections.push(scaling(page)); }
    var next = h("main", { id: "content" }, sections.concat([reloads(page), alerts(page)]));
    main.parentNode.replaceChild(next, main);
    var when = document.getElementById("generated");
    when.setAttribute("datetime", page.generated_at);
    when.textContent = page.generated_at;
  }

  function start() {
    var live = document.getElementById("live");
    var every = Number(document.body.getAttribute("data-refresh-s")) || 5;
    live.textContent = "(refreshes every " + every + " s)";
    function poll() {
      fetch("/admin/overview", { credentials: "same-origin", headers: { Accept: "application/json" }, cache: "no-store" })
        .then(function (r) {
          if (r.status === 401) { window.location.assign("/login"); return null; }
          if (!r.ok) { throw new Error("HTTP " + r.status); }
          return r.json();
        })
        .then(function (page) {
          if (page) { draw(page); live.className = "live"; live.textContent = "(refreshes every " + every + " s)"; }
        })
        .catch(function () { live.className = "live stale"; live.textContent = "(controller not answering: figures may be old)"; })
        .then(function () { window.setTimeout(poll, every * 1000); });
    }
    window.setTimeout(poll, every * 1000);
  }

  if (document.readyState === "loading") { document.addEventListener("DOMContentLoaded", start); } else { start(); }
}());
