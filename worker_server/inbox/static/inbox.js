// Live updates for the taskwarden inbox. Pages work without this file: every
// action is a plain form. With it, a server-sent "change" event re-fetches the
// page and swaps in the regions marked data-live, keeping anything typed.
(function () {
  "use strict";

  var url = document.body.getAttribute("data-events");
  if (!url || !window.EventSource || !window.fetch || !window.DOMParser) {
    return;
  }
  var busy = false;
  var again = false;
  var status = document.getElementById("live-status");

  function keepDrafts(region) {
    var drafts = {};
    region.querySelectorAll("textarea[id], input[type=text][id]").forEach(function (el) {
      drafts[el.id] = { value: el.value, focused: document.activeElement === el };
    });
    return drafts;
  }

  function restoreDrafts(region, drafts) {
    Object.keys(drafts).forEach(function (id) {
      var el = region.querySelector("#" + CSS.escape(id));
      if (!el) {
        return;
      }
      if (drafts[id].value) {
        el.value = drafts[id].value;
      }
      if (drafts[id].focused) {
        el.focus();
      }
    });
  }

  function swap(html) {
    var fresh = new DOMParser().parseFromString(html, "text/html");
    document.querySelectorAll("[data-live][id]").forEach(function (region) {
      var next = fresh.getElementById(region.id);
      if (!next) {
        return;
      }
      var drafts = keepDrafts(region);
      var node = document.importNode(next, true);
      region.replaceWith(node);
      restoreDrafts(node, drafts);
    });
  }

  function refresh() {
    if (busy) {
      again = true;
      return;
    }
    busy = true;
    fetch(window.location.href, { credentials: "same-origin" })
      .then(function (response) {
        if (response.status === 401) {
          window.location.reload();
          return null;
        }
        return response.text();
      })
      .then(function (html) {
        if (html) {
          swap(html);
        }
      })
      .catch(function () {})
      .then(function () {
        busy = false;
        if (again) {
          again = false;
          refresh();
        }
      });
  }

  var source = new EventSource(url);
  source.addEventListener("ready", function () {
    if (status) {
      status.hidden = false;
    }
    // A change made after this page was rendered but before the stream opened
    // (or while it was reconnecting) sent no event here: look once now.
    refresh();
  });
  source.addEventListener("change", refresh);
  source.addEventListener("signed-out", function () {
    source.close();
    window.location.reload();
  });
  source.addEventListener("error", function () {
    if (status) {
      status.hidden = true;
    }
  });
})();
