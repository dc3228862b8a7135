/*
 * Switchboard chat widget.
 *   <script src="https://console.example.com/static/widget.js" data-key="wk_..." defer></script>
 * Who the visitor is (optional): data-name, data-email, data-identifier and
 * data-identifier-hash on that tag, or window.SwitchboardSettings = {identity: {...}} set
 * before it loads, or, once the "switchboard:ready" event has fired (or window.Switchboard
 * exists), Switchboard.identify({name, email, identifier, identifier_hash})
 * where identifier_hash = hex HMAC-SHA256(the tenant's identity secret, identifier), computed
 * by the site's server. Switchboard.open() / close() / toggle() drive the panel.
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
    ".pending{opacity:.6}",
    ".failed{opacity:.6;text-decoration:line-through}",
    ".divider{align-self:stretch;border-top:1px solid #d9dde5;padding-top:6px}",
    ".interrupted{margin-top:4px;font-style:italic}",
    ".head button:disabled{opacity:.5;cursor:default}",
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
  launcher.setAttribute("aria-expanded", "false");
  launcher.setAttribute("aria-controls", "switchboard-chat-panel");
  var panel = el("section", "panel");
  panel.id = "switchboard-chat-panel";
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
    // Screen readers would read each as "black star": the label says what it does.
    star.setAttribute("aria-label", "Rate " + score + " of 5");
    star.addEventListener("click", function () { sendFrame({ type: "rate", score: score }); });
    rate.appendChild(star);
  });

  // After a rating: an optional comment, sent as the same rating with its text.
  var commentForm = null;
  function askComment(score) {
    if (commentForm) commentForm.remove();
    commentForm = el("form", "comment");
    var box = el("textarea");
    box.setAttribute("aria-label", "Comment on your rating (optional)");
    box.placeholder = "Anything to add? (optional)";
    box.maxLength = 1000;
    var go = el("button", "", "Send comment");
    go.type = "submit";
    commentForm.appendChild(box);
    commentForm.appendChild(go);
    commentForm.addEventListener("submit", function (event) {
      event.preventDefault();
      if (box.value.trim()) sendFrame({ type: "rate", score: score, comment: box.value });
    });
    log.appendChild(commentForm);
    log.scrollTop = log.scrollHeight;
  }

  function load() {
    try { return JSON.parse(localStorage.getItem(STORE)) || {}; } catch (e) { return {}; }
  }
  var state = load();
  state.resume = state.resume || {};
  function save() {
    try { localStorage.setItem(STORE, JSON.stringify(state)); } catch (e) { /* private mode */ }
  }

  // Who the embedding site says the visitor is; sent with every session_init.
  var identity = null;
  function identify(details) {
    if (!details || typeof details !== "object") return;
    identity = {};
    ["name", "email", "identifier", "identifier_hash"].forEach(function (field) {
      if (typeof details[field] === "string" && details[field]) identity[field] = details[field];
    });
    if (ready) sendFrame({ type: "identify", identity: identity });
  }
  var fromTag = {
    name: script.getAttribute("data-name"),
    email: script.getAttribute("data-email"),
    identifier: script.getAttribute("data-identifier"),
    identifier_hash: script.getAttribute("data-identifier-hash")
  };
  if (fromTag.name || fromTag.email || fromTag.identifier) identify(fromTag);
  // Or set before the widget loads: window.SwitchboardSettings = { identity: {...} }.
  if (window.SwitchboardSettings && window.SwitchboardSettings.identity) {
    identify(window.SwitchboardSettings.identity);
  }

  var socket = null;
  var attempt = 0;
  var refused = false;
  var connectedOnce = false; // a session was up before: a drop now is a reconnect
  var ready = false;         // this socket's session is up: messages may be sent
  var bubbles = {};          // message id ("m12") or reply id ("r11") -> element
  var shownChat = null;      // the chat whose messages are on screen
  var firstId = null;
  var moreButton = null;
  // Messages not yet acknowledged, oldest first: each is sent once per socket and stays
  // here until the server says it has it (a socket that drops, or an outage, loses none).
  var outbox = [];
  var pending = {};          // client id -> the visitor's bubble until the server has it
  var streaming = {};        // reply ids being streamed now
  var ended = false;         // the chat on screen has ended
  var endNote = null;
  var connectNote = null;

  function note(text, isError) {
    var node = el("div", "note" + (isError ? " error" : ""), text);
    log.appendChild(node);
    log.scrollTop = log.scrollHeight;
    return node;
  }

  var MARKERS = {
    stopped: "(stopped: this reply is incomplete)",
    cut: "(cut off before the end: this reply is incomplete)"
  };
  function fill(node, message) {
    node.innerHTML = message.html;  // sanitised by the server
    if (MARKERS[message.interrupted]) {
      node.appendChild(el("div", "note interrupted", MARKERS[message.interrupted]));
    }
  }

  function messageNode(message) {
    var node = el("div", "msg " + message.sender);
    fill(node, message);
    bubbles["m" + message.id] = node;
    if (firstId === null || message.id < firstId) firstId = message.id;
    return node;
  }

  function renderMessage(message, prepend) {
    if (bubbles["m" + message.id]) return bubbles["m" + message.id];
    var node = messageNode(message);
    if (prepend) {
      log.insertBefore(node, moreButton ? moreButton.nextSibling : log.firstChild);
    } else {
      log.appendChild(node);
      log.scrollTop = log.scrollHeight;
    }
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

  function setStreaming(replyId, on) {
    if (on) streaming[replyId] = true; else delete streaming[replyId];
    stopButton.classList.toggle("on", Object.keys(streaming).length > 0);
  }

  // A reply that finished while this widget was away: its bubble (partial or not yet shown)
  // becomes the saved message, once.
  function finishReply(replyId, message) {
    var node = bubbles[replyId];
    if (node && message && bubbles["m" + message.id] && bubbles["m" + message.id] !== node) {
      node.remove();  // the saved message is on screen already
      node = bubbles["m" + message.id];
    } else if (node && message) {
      fill(node, message);
      bubbles["m" + message.id] = node;
    } else if (message) {
      node = renderMessage(message);
    }
    delete bubbles[replyId];
    delete state.resume[replyId];
    setStreaming(replyId, false);
    save();
    return node;
  }

  var typingNote = null;
  function setTyping(on) {
    if (on && !typingNote) typingNote = note("Assistant is typing…");
    if (!on && typingNote) { typingNote.remove(); typingNote = null; }
  }

  function setConnectNote(text) {
    if (connectNote) { connectNote.remove(); connectNote = null; }
    if (text) connectNote = note(text);
  }

  function showEnded(satisfaction) {
    ended = true;
    endButton.disabled = true;
    if (!endNote) {
      endNote = note("This chat has ended. Write below to start a new conversation.");
      endNote.classList.add("ended");
    }
    if (satisfaction) {
      rate.classList.remove("on");
      endNote.textContent = "This chat has ended. You rated it " + satisfaction +
        " of 5. Write below to start a new conversation.";
    } else {
      rate.classList.add("on");
    }
  }

  function clearEnded() {
    ended = false;
    endButton.disabled = false;
    endNote = null;
    rate.classList.remove("on");
  }

  function flushOutbox() {
    var now = Date.now();
    for (var i = 0; ready && i < outbox.length; i++) {
      var item = outbox[i];
      if (item.sentOn === socket || item.notBefore > now) continue;
      if (!sendFrame({ type: "message", content: item.content, client_id: item.clientId })) return;
      item.sentOn = socket;
    }
  }

  function forgetOutboxItem(clientId) {
    outbox = outbox.filter(function (item) { return item.clientId !== clientId; });
  }

  var handlers = {
    welcome: function (frame) {
      if (frame.visitor_token) { state.visitor = frame.visitor_token; save(); }
      attempt = 0;
      // Resume only replies whose text so far is still on screen; the server sends the
      // rest (or, after a page load, the whole reply again).
      var resume = {};
      Object.keys(state.resume).forEach(function (id) { if (bubbles[id]) resume[id] = state.resume[id]; });
      var init = { type: "session_init", chat_id: state.chat_id || null, resume: resume };
      if (identity) init.identity = identity;
      sendFrame(init);
    },
    session: function (frame) {
      if (frame.chat_id !== state.chat_id) { state.resume = {}; }
      state.chat_id = frame.chat_id;
      save();
      if (frame.chat_id !== shownChat) {
        // Another chat than the one on screen (a page load, or ours expired): start afresh,
        // keeping only bubbles of messages still waiting to be sent.
        log.textContent = "";
        bubbles = {};
        streaming = {};
        firstId = null;
        endNote = null;
        connectNote = null;
        Object.keys(pending).forEach(function (id) { log.appendChild(pending[id]); });
        shownChat = frame.chat_id;
      }
      var waiting = Object.keys(pending).map(function (id) { return pending[id]; });
      frame.messages.forEach(function (m) {
        var reply = m.sender === "assistant" && m.in_response_to ? "r" + m.in_response_to : null;
        if (reply && bubbles[reply]) { finishReply(reply, m); return; }
        var node = renderMessage(m);
        // Messages missed while away go above the ones still being sent.
        if (waiting.length && node.parentNode === log) log.insertBefore(node, waiting[0]);
      });
      // Bubbles of replies that are neither finished nor still resumable are dropped.
      Object.keys(bubbles).forEach(function (id) {
        if (id.charAt(0) === "r" && state.resume[id] === undefined) {
          bubbles[id].remove();
          delete bubbles[id];
          setStreaming(id, false);
        }
      });
      stopButton.classList.toggle("on", Object.keys(streaming).length > 0);
      showMore(frame.has_more);
      if (frame.status === "completed") showEnded(frame.satisfaction); else if (ended) clearEnded();
      ready = true;
      connectedOnce = true;
      setConnectNote(null);
      flushOutbox();
    },
    message: function (frame) {
      // The visitor's first message creates the chat; its acknowledgement names it, so a
      // reconnect (or a reload) resumes this chat.
      if (frame.chat_id && frame.chat_id !== state.chat_id) {
        state.chat_id = frame.chat_id;
        state.resume = {};
        save();
      }
      if (frame.chat_id) shownChat = frame.chat_id;
      var mine = frame.client_id && pending[frame.client_id];
      if (mine && !bubbles["m" + frame.message.id]) {
        mine.replaceWith(messageNode(frame.message));
      } else if (mine) {
        mine.remove();
      } else {
        renderMessage(frame.message);
      }
      if (frame.client_id) {
        delete pending[frame.client_id];
        forgetOutboxItem(frame.client_id);
        if (!outbox.length) setConnectNote(null);
      }
    },
    history: function (frame) {
      frame.messages.slice().reverse().forEach(function (m) { renderMessage(m, true); });
      showMore(frame.has_more);
    },
    typing: function (frame) { if (frame.from === "assistant") setTyping(true); },
    delta: function (frame) {
      setTyping(false);
      setStreaming(frame.reply_id, true);
      var node = replyBubble(frame.reply_id);
      node.appendChild(document.createTextNode(frame.text));
      state.resume[frame.reply_id] = frame.seq;
      log.scrollTop = log.scrollHeight;
    },
    done: function (frame) {
      setTyping(false);
      var node = finishReply(frame.reply_id, frame.message);
      if (!frame.message && node) node.remove();
      log.scrollTop = log.scrollHeight;
    },
    status: function (frame) {
      if (frame.chat_id !== state.chat_id) return;  // about a chat no longer on screen
      if (frame.status === "completed") showEnded(frame.satisfaction);
    },
    rated: function (frame) {
      rate.classList.remove("on");
      if (frame.comment) {
        if (commentForm) { commentForm.remove(); commentForm = null; }
        note("Thank you for your comment!");
        return;
      }
      note("Thank you for your feedback!");
      askComment(frame.score);
      if (endNote) {
        endNote.textContent = "This chat has ended. You rated it " + frame.score +
          " of 5. Write below to start a new conversation.";
      }
    },
    identified: function () {},
    error: function (frame) {
      if (frame.code === "identity_refused") {
        // The embedding site's mistake, not the visitor's: tell its developer only.
        if (window.console) console.warn("Switchboard: " + frame.message);
        return;
      }
      var text = frame.message || "Something went wrong.";
      var waiting = frame.code === "unavailable" && frame.client_id &&
        outbox.filter(function (item) { return item.clientId === frame.client_id; })[0];
      if (waiting) {  // not saved, for now: it stays queued and goes again shortly
        var delay = 1000 * (frame.retry_after || 3);
        waiting.sentOn = null;
        waiting.notBefore = Date.now() + delay;
        setTimeout(flushOutbox, delay + 50);
        setConnectNote("Your message will be sent again in a moment…");
        return;
      }
      if (frame.client_id) forgetOutboxItem(frame.client_id);
      var refusedBubble = frame.client_id && pending[frame.client_id];
      if (refusedBubble) {  // that message was not saved: say so on it
        refusedBubble.classList.remove("pending");
        refusedBubble.classList.add("failed");
        refusedBubble.title = "Not sent";
        delete pending[frame.client_id];
      }
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
    ready = false;
    socket = new WebSocket(url);
    socket.addEventListener("message", function (event) {
      var frame;
      try { frame = JSON.parse(event.data); } catch (e) { return; }
      var handle = handlers[frame.type];
      if (handle) handle(frame);
    });
    socket.addEventListener("close", function (event) {
      ready = false;
      setTyping(false);
      if (event.code === 1008) {  // policy: wrong key or origin; retrying won't help
        refused = true;
        setConnectNote(null);
        note("Chat is not available on this site.", true);
        return;
      }
      if (outbox.length) setConnectNote(connectedOnce ? "Reconnecting…" : "Connecting…");
      attempt += 1;
      var delay = Math.min(30000, 500 * Math.pow(2, attempt - 1));
      delay = delay * (0.7 + Math.random() * 0.6);
      setTimeout(connect, delay);
    });
  }

  function setOpen(open) {
    panel.classList.toggle("open", open);
    launcher.setAttribute("aria-expanded", open ? "true" : "false");
    if (open) {
      if (!socket && !refused) connect();
      input.focus();
    }
  }
  launcher.addEventListener("click", function () { setOpen(!panel.classList.contains("open")); });
  panel.addEventListener("keydown", function (event) {
    if (event.key === "Escape") {
      setOpen(false);
      launcher.focus();
    }
  });
  var sequence = 0;
  form.addEventListener("submit", function (event) {
    event.preventDefault();
    var text = input.value;
    if (!text.trim() || refused) return;
    input.value = "";
    stopTyping();
    if (ended) {
      // A new message after the end starts a new conversation: say so where it begins.
      clearEnded();
      var divider = note("New conversation");
      divider.classList.add("divider");
    }
    sequence += 1;
    var clientId = "c" + Date.now().toString(36) + "-" + sequence;
    var bubble = el("div", "msg visitor pending", text);
    pending[clientId] = bubble;
    log.appendChild(bubble);
    log.scrollTop = log.scrollHeight;
    outbox.push({ content: text, clientId: clientId, sentOn: null, notBefore: 0 });
    if (ready) flushOutbox();
    else setConnectNote(connectedOnce ? "Reconnecting… your message will be sent." :
      "Connecting… your message will be sent.");
  });
  input.addEventListener("keydown", function (event) {
    if (event.key === "Enter" && !event.shiftKey) {
      event.preventDefault();
      form.requestSubmit();
    }
  });
  // The console shows "Visitor is typing…" from the first key until the box empties, the
  // message goes, or the visitor pauses.
  var lastTyping = 0;
  var typingIdle = null;
  function stopTyping() {
    if (typingIdle === null) return;
    clearTimeout(typingIdle);
    typingIdle = null;
    lastTyping = 0;
    if (ready) sendFrame({ type: "typing", state: "stop" });
  }
  input.addEventListener("input", function () {
    if (!input.value) { stopTyping(); return; }
    var now = Date.now();
    if (ready && now - lastTyping > 3000) { lastTyping = now; sendFrame({ type: "typing" }); }
    clearTimeout(typingIdle);
    typingIdle = setTimeout(stopTyping, 6000);
  });
  stopButton.addEventListener("click", function () { sendFrame({ type: "cancel" }); });
  endButton.addEventListener("click", function () { sendFrame({ type: "session_close" }); });

  window.Switchboard = {
    identify: identify,
    open: function () { setOpen(true); },
    close: function () { setOpen(false); },
    toggle: function () { setOpen(!panel.classList.contains("open")); }
  };
  try {
    window.dispatchEvent(new CustomEvent("switchboard:ready"));
  } catch (e) { /* very old browsers: Switchboard is there all the same */ }

  function mount() { document.body.appendChild(host); }
  if (document.body) mount(); else document.addEventListener("DOMContentLoaded", mount);
})();
