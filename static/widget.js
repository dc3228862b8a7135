/*
 * Switchboard chat widget.
 *   <script src="https://console.example.com/static/widget.js" data-key="wk_..." defer></script>
 * Plain JavaScript, no build step. Everything lives in a shadow root, so the host page's
 * styles don't reach in and ours don't leak out. Text from the network is inserted with
 * textContent; only HTML the server has already sanitised is inserted as markup.
 */
(function () {
  "use strict";
  var script = document.currentScript ||
    document.querySelector('script[data-key][src*="widget.js"]');
  if (!script || window.__switchboardWidget) return;
  window.__switchboardWidget = true;

  var KEY = script.getAttribute("data-key");
  var SERVER = new URL(script.src, location.href);
  var WS_BASE = (SERVER.protocol === "https:" ? "wss://" : "ws://") + SERVER.host + "/ws/chat";
  var STORE = "switchboard-chat:" + KEY;

  var CSS = [
    ":host{all:initial}",
    "*{box-sizing:border-box;font-family:system-ui,-apple-system,'Segoe UI',sans-serif}",
    ".launcher{position:fixed;right:20px;bottom:20px;z-index:2147483000;border:0;border-radius:24px;",
    "padding:12px 18px;background:#2f5bea;color:#fff;font-size:15px;cursor:pointer;",
    "box-shadow:0 4px 14px rgba(0,0,0,.2)}",
    ".panel{position:fixed;right:20px;bottom:76px;z-index:2147483000;width:340px;max-width:calc(100vw - 40px);",
    "height:460px;max-height:calc(100vh - 100px);display:none;flex-direction:column;background:#fff;",
    "border:1px solid #d9dde5;border-radius:12px;box-shadow:0 8px 30px rgba(0,0,0,.18);overflow:hidden;color:#1d2330}",
    ".panel.open{display:flex}",
    ".head{padding:10px 14px;background:#2f5bea;color:#fff;display:flex;justify-content:space-between;align-items:center}",
    ".head button{background:none;border:0;color:#fff;cursor:pointer;font-size:13px}",
    ".log{flex:1;overflow-y:auto;padding:10px;display:flex;flex-direction:column;gap:6px;font-size:14px}",
    ".msg{padding:7px 10px;border-radius:10px;max-width:85%;line-height:1.4;word-wrap:break-word}",
    ".msg p{margin:0 0 4px}.msg p:last-child{margin:0}",
    ".visitor{align-self:flex-end;background:#2f5bea;color:#fff}",
    ".assistant,.operator,.system{align-self:flex-start;background:#f0f2f7}",
    ".operator{background:#fff4d6}",
    ".note{align-self:center;color:#667085;font-size:12px;text-align:center}",
    ".error{color:#c0362c}",
    "form{display:flex;gap:6px;padding:8px;border-top:1px solid #e3e6ec}",
    "textarea{flex:1;resize:none;height:40px;padding:8px;border:1px solid #d9dde5;border-radius:8px;font-size:14px}",
    "form button,.more,.stop{border:0;border-radius:8px;background:#2f5bea;color:#fff;padding:0 12px;cursor:pointer}",
    ".stop{background:#667085;margin:0 10px 6px;padding:4px 10px;align-self:flex-start;display:none}",
    ".stop.on{display:block}",
    ".more{background:#eef0f4;color:#1d2330;padding:4px 10px;align-self:center}",
    ".rate{display:none;padding:8px;gap:4px;justify-content:center;border-top:1px solid #e3e6ec}",
    ".rate.on{display:flex}.rate button{border:0;background:none;font-size:20px;cursor:pointer}"
  ].join("");

  var host = document.createElement("div");
  host.id = "switchboard-chat";
  var root = host.attachShadow({ mode: "open" });
  if (root.adoptedStyleSheets !== undefined && window.CSSStyleSheet) {
    var sheet = new CSSStyleSheet();
    sheet.replaceSync(CSS);
    root.adoptedStyleSheets = [sheet];
  } else {
    var style = document.createElement("style");
    style.textContent = CSS;
    root.appendChild(style);
  }

  function el(tag, cls, text) {
    var node = document.createElement(tag);
    if (cls) node.className = cls;
    if (text) node.textContent = text;
    return node;
  }

  var launcher = el("button", "launcher", "Chat with us");
  launcher.type = "button";
  var panel = el("section", "panel");
  panel.setAttribute("role", "dialog");
  panel.setAttribute("aria-label", "Chat");
  var head = el("div", "head");
  head.appendChild(el("strong", "", "Chat"));
  var endButton = el("button", "", "End chat");
  endButton.type = "button";
  head.appendChild(endButton);
  var log = el("div", "log");
  log.setAttribute("aria-live", "polite");
  var stopButton = el("button", "stop", "Stop");
  stopButton.type = "button";
  var rate = el("div", "rate");
  var form = el("form");
  var input = el("textarea");
  input.placeholder = "Type your message…";
  input.setAttribute("aria-label", "Message");
  var send = el("button", "", "Send");
  send.type = "submit";
  form.appendChild(input);
  form.appendChild(send);
  panel.appendChild(head);
  panel.appendChild(log);
  panel.appendChild(stopButton);
  panel.appendChild(rate);
  panel.appendChild(form);
  root.appendChild(launcher);
  root.appendChild(panel);
  [1, 2, 3, 4, 5].forEach(function (score) {
    var star = el("button", "", "★");
    star.type = "button";
    star.title = score + " of 5";
    star.addEventListener("click", function () { sendFrame({ type: "rate", score: score }); });
    rate.appendChild(star);
  });

  function load() {
    try { return JSON.parse(localStorage.getItem(STORE)) || {}; } catch (e) { return {}; }
  }
  var state = load();
  state.resume = state.resume || {};
  function save() {
    try { localStorage.setItem(STORE, JSON.stringify(state)); } catch (e) { /* private mode */ }
  }

  var socket = null;
  var attempt = 0;
  var refused = false;
  var bubbles = {};   // message id or reply id -> element
  var firstId = null;
  var moreButton = null;

  function note(text, isError) {
    var node = el("div", "note" + (isError ? " error" : ""), text);
    log.appendChild(node);
    log.scrollTop = log.scrollHeight;
    return node;
  }

  function renderMessage(message, prepend) {
    if (bubbles["m" + message.id]) return bubbles["m" + message.id];
    var node = el("div", "msg " + message.sender);
    node.innerHTML = message.html;  // sanitised by the server
    bubbles["m" + message.id] = node;
    if (prepend) {
      log.insertBefore(node, moreButton ? moreButton.nextSibling : log.firstChild);
    } else {
      log.appendChild(node);
      log.scrollTop = log.scrollHeight;
    }
    if (firstId === null || message.id < firstId) firstId = message.id;
    return node;
  }

  function showMore(hasMore) {
    if (moreButton) { moreButton.remove(); moreButton = null; }
    if (!hasMore) return;
    moreButton = el("button", "more", "Load earlier messages");
    moreButton.type = "button";
    moreButton.addEventListener("click", function () {
      if (firstId !== null) sendFrame({ type: "history", before: firstId });
    });
    log.insertBefore(moreButton, log.firstChild);
  }

  function replyBubble(replyId) {
    var node = bubbles[replyId];
    if (!node) {
      node = el("div", "msg assistant");
      node.setAttribute("data-reply", replyId);
      bubbles[replyId] = node;
      log.appendChild(node);
    }
    return node;
  }

  var typingNote = null;
  function setTyping(on) {
    if (on && !typingNote) typingNote = note("Assistant is typing…");
    if (!on && typingNote) { typingNote.remove(); typingNote = null; }
  }

  var handlers = {
    welcome: function (frame) {
      if (frame.visitor_token) { state.visitor = frame.visitor_token; save(); }
      attempt = 0;
      // Resume only replies whose text so far is still on screen; the server sends the
      // rest (or, after a page load, the whole reply again).
      var resume = {};
      Object.keys(state.resume).forEach(function (id) { if (bubbles[id]) resume[id] = state.resume[id]; });
      sendFrame({ type: "session_init", chat_id: state.chat_id || null, resume: resume });
    },
    session: function (frame) {
      if (frame.chat_id !== state.chat_id) { state.resume = {}; }
      state.chat_id = frame.chat_id;
      save();
      var streaming = {};
      Object.keys(state.resume).forEach(function (id) { if (bubbles[id]) streaming[id] = bubbles[id]; });
      log.textContent = "";
      bubbles = {};
      firstId = null;
      frame.messages.forEach(function (m) { renderMessage(m); });
      showMore(frame.has_more);
      Object.keys(streaming).forEach(function (id) {  // replies still streaming stay as they were
        bubbles[id] = streaming[id];
        log.appendChild(streaming[id]);
      });
      if (frame.status === "completed") { rate.classList.add("on"); note("This chat has ended. How did we do?"); }
    },
    message: function (frame) {
      // The visitor's first message creates the chat; its acknowledgement names it, so a
      // reconnect (or a reload) resumes this chat.
      if (frame.chat_id && frame.chat_id !== state.chat_id) {
        state.chat_id = frame.chat_id;
        save();
      }
      renderMessage(frame.message);
    },
    history: function (frame) {
      frame.messages.slice().reverse().forEach(function (m) { renderMessage(m, true); });
      showMore(frame.has_more);
    },
    typing: function (frame) { if (frame.from === "assistant") setTyping(true); },
    delta: function (frame) {
      setTyping(false);
      stopButton.classList.add("on");
      var node = replyBubble(frame.reply_id);
      node.appendChild(document.createTextNode(frame.text));
      state.resume[frame.reply_id] = frame.seq;
      log.scrollTop = log.scrollHeight;
    },
    done: function (frame) {
      setTyping(false);
      stopButton.classList.remove("on");
      var node = replyBubble(frame.reply_id);
      if (frame.message) {
        node.innerHTML = frame.message.html;  // sanitised by the server
        bubbles["m" + frame.message.id] = node;
      }
      if (frame.cancelled) node.appendChild(el("div", "note", "(stopped)"));
      delete state.resume[frame.reply_id];
      save();
    },
    rated: function () { rate.classList.remove("on"); note("Thank you for your feedback!"); },
    error: function (frame) {
      var text = frame.message || "Something went wrong.";
      if (frame.code === "no_session") {
        state.chat_id = null;
        save();
        sendFrame({ type: "session_init" });
      }
      note(text, true);
    }
  };

  function sendFrame(frame) {
    if (socket && socket.readyState === WebSocket.OPEN) {
      socket.send(JSON.stringify(frame));
      return true;
    }
    return false;
  }

  function connect() {
    var url = WS_BASE + "?key=" + encodeURIComponent(KEY) +
      (state.visitor ? "&visitor=" + encodeURIComponent(state.visitor) : "");
    socket = new WebSocket(url);
    socket.addEventListener("message", function (event) {
      var frame;
      try { frame = JSON.parse(event.data); } catch (e) { return; }
      var handle = handlers[frame.type];
      if (handle) handle(frame);
    });
    socket.addEventListener("close", function (event) {
      setTyping(false);
      if (event.code === 1008) {  // policy: wrong key or origin; retrying won't help
        refused = true;
        note("Chat is not available on this site.", true);
        return;
      }
      attempt += 1;
      var delay = Math.min(30000, 500 * Math.pow(2, attempt - 1));
      delay = delay * (0.7 + Math.random() * 0.6);
      setTimeout(connect, delay);
    });
  }

  launcher.addEventListener("click", function () {
    panel.classList.toggle("open");
    if (panel.classList.contains("open")) {
      if (!socket && !refused) connect();
      input.focus();
    }
  });
  form.addEventListener("submit", function (event) {
    event.preventDefault();
    var text = input.value;
    if (!text.trim()) return;
    if (sendFrame({ type: "message", content: text })) {
      input.value = "";
    } else {
      note("Reconnecting… your message was not sent yet.", true);
    }
  });
  input.addEventListener("keydown", function (event) {
    if (event.key === "Enter" && !event.shiftKey) {
      event.preventDefault();
      form.requestSubmit();
    }
  });
  var lastTyping = 0;
  input.addEventListener("input", function () {
    var now = Date.now();
    if (now - lastTyping > 3000) { lastTyping = now; sendFrame({ type: "typing" }); }
  });
  stopButton.addEventListener("click", function () { sendFrame({ type: "cancel" }); });
  endButton.addEventListener("click", function () { sendFrame({ type: "session_close" }); });

  function mount() { document.body.appendChild(host); }
  if (document.body) mount(); else document.addEventListener("DOMContentLoaded", mount);
})();
