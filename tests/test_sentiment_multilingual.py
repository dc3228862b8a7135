"""Escalation in English, Spanish and Portuguese: the language detector, the offline analyser's
rules on fixed sentences, the evaluation command, the LLM backend against the local fake model
(batching, JSON, timeout, fallback), tenants' escalation phrases and the reply's language."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest
from sqlalchemy import select

from models.chats import Agent, EscalationRule, Message
from models.events import OutboxEvent
from models.notifications import Notification
from services import chats, lexicons
from services.assistant import build_messages
from services.sentiment import (
    analyse,
    detect_language,
    evaluate,
    label_for,
    lexicon_score,
    vader,
)
from tests.conftest import drain, login
from tests.fake_openai import FakeOpenAI, Script

EVAL_FILE = Path(__file__).parent / "data" / "sentiment_eval.tsv"


def es(text: str) -> float:
    return lexicon_score(text, "es")


def pt(text: str) -> float:
    return lexicon_score(text, "pt")


# ------------------------------------------------------------------ language


@pytest.mark.parametrize(
    "text, language",
    [
        ("My order never arrived and nobody answers", "en"),
        ("Llevo tres días esperando y nadie me contesta", "es"),
        ("Estou esperando há três dias e ninguém me responde", "pt"),
        ("quero cancelar minha assinatura", "pt"),
        ("quiero darme de baja", "es"),
        ("nao funciona de novo", "pt"),  # no accents
        ("gracias", "es"),
        ("obrigado", "pt"),
        ("hola", "es"),  # the model alone says English
        ("hola que tal", "es"),  # ... and Portuguese
        ("valeu", "pt"),
    ],
)
def test_the_language_is_told_apart_on_short_chat_messages(text, language):
    assert detect_language(text) == language


def test_a_message_without_words_has_no_language():
    assert detect_language("👍") is None
    assert detect_language("?? 123") is None


def test_the_detector_is_right_on_nearly_all_of_the_labelled_set():
    rows = _rows()
    right = sum(detect_language(text) == lang for _, lang, _, text in rows)
    assert right / len(rows) >= 0.97


# ------------------------------------------------------------------ the analyser's rules


def test_negation_flips_the_sentiment():
    assert es("me gusta el producto") > 0 > es("no me gusta el producto")
    assert pt("gostei do produto") > 0 > pt("não gostei do produto")
    assert pt("nunca gostei desse app") < 0
    # "nada mal" is praise: the negation inside the phrase is not applied a second time
    assert es("no está nada mal") > 0 and pt("nada mal") > 0


def test_negation_stops_at_a_conjunction():
    assert es("El técnico no vino y perdí toda la mañana") < 0
    assert pt("O técnico não apareceu e perdi a manhã toda") < 0


def test_intensifiers_raise_and_dampeners_lower():
    assert es("el servicio es muy malo") < es("el servicio es malo") < 0
    assert pt("atendimento muito ruim") < pt("atendimento ruim") < 0
    assert pt("fácil demais") > pt("fácil") > 0  # "demais" comes after the word
    assert es("es algo malo") > es("es malo")


def test_the_clause_after_the_contrast_word_wins():
    assert es("El producto parecía bueno pero se rompió el primer día") < 0
    assert es("Tardaron mucho pero al final lo solucionaron, gracias") > 0
    assert pt("O produto parecia bom mas quebrou no primeiro dia") < 0
    assert pt("Demorou um pouco mas resolveram, obrigado") > 0


def test_capitals_exclamations_and_emoji_count():
    assert es("es HORRIBLE el servicio") < es("es horrible el servicio")
    assert pt("péssimo!!!") < pt("péssimo")
    assert es("el pedido 😡") < 0 < es("el pedido 👍")
    assert es("hola :(") < 0 < es("gracias :)")
    assert es("el enlace es https://example.com/pedido") == 0  # a URL's ":/" is no frown


def test_customer_service_phrasing_is_negative():
    for text in ("llevo tres días esperando", "quiero darme de baja", "gracias por nada"):
        assert es(text) <= -0.3, text
    for text in ("quero cancelar", "isso é um absurdo", "vou reclamar no Procon"):
        assert pt(text) <= -0.3, text


def test_typos_and_missing_accents_read_like_the_real_words():
    assert pt("nao funciona") == pt("não funciona") < 0
    assert es("pesimo servicio") == es("pésimo servicio") < 0
    assert pt("pessimooo") < 0  # a drawn-out word


def test_plain_questions_do_not_escalate():
    for text, lang in [
        ("¿Puedo cancelar un pedido antes de que lo envíen?", "es"),
        ("Posso cancelar um pedido antes de ser enviado?", "pt"),
        ("Can I cancel an order before it ships?", "en"),
    ]:
        assert analyse(text, lang, backend="lexicon").label != "negative", text


def test_english_keeps_vader_and_adds_the_phrases_it_lacks():
    plain = "The quality is awful and the sizes are all wrong"
    assert lexicon_score(plain, "en") == pytest.approx(vader(plain).score, abs=1e-3)
    # VADER alone finds nothing wrong here; the support phrasing does
    assert vader("i paid for express shipping and its been 10 days").label != "negative"
    assert analyse("i paid for express shipping and its been 10 days", "en").label == "negative"


NEGATIVE_BY_RULE = {
    "a breaking verb in any form": [
        ("es", "la lavadora se estropeó a la semana"),
        ("es", "me estropearon la mudanza"),
        ("pt", "o carregador estragou em uma semana"),
        ("pt", "quebraram a tampa na entrega"),
        ("en", "the lid cracked on the first day"),  # VADER has no "cracked"
    ],
    "charged twice in any tense and word order": [
        ("es", "me cobrasteis el envío dos veces"),
        ("pt", "me cobraram a taxa duas vezes"),
        ("en", "you charged my card twice"),
    ],
    "time passing without a solution": [
        ("es", "llevo cinco días sin luz"),
        ("es", "del paquete ni rastro"),
        ("es", "y del reembolso, hasta ahora nada"),
        ("pt", "faz duas semanas que pedi"),
        ("pt", "até agora nada do técnico"),
        ("pt", "do pedido nem sinal"),
        ("en", "still nothing from your team"),
        ("en", "two weeks and still the same"),
    ],
    "praise that opens a complaint is sarcasm": [
        ("es", "Genial, el router vuelve a estar mal"),
        ("pt", "Que maravilha, o boleto veio errado de novo"),
        ("en", "Great, the charger is broken again. thanks a lot"),
    ],
    "thanks or congratulations that close a complaint are sarcasm": [
        ("es", "se me rompió la pantalla, gracias por eso"),
        ("pt", "o app travou de novo, parabéns"),
        ("en", "the update deleted my photos, thanks for that"),
    ],
    "writing about the same thing again": [
        ("es", "es mi cuarto correo sobre esto"),
        ("pt", "essa é minha terceira reclamação"),
        ("en", "this is my fourth email about it"),
    ],
    "the wrong thing sent": [
        ("es", "esto no es lo que pedí"),
        ("pt", "isso não é o que eu pedi"),
        ("en", "this is not what I ordered"),
    ],
    "complaints VADER misses": [
        ("en", "nobody answered my emails"),
        ("en", "this warranty is a joke"),
    ],
}


@pytest.mark.parametrize(
    "rule, language, text",
    [(rule, lang, text) for rule, cases in NEGATIVE_BY_RULE.items() for lang, text in cases],
)
def test_customer_service_rules_make_a_complaint_negative(rule, language, text):
    assert lexicon_score(text, language) <= -0.3, rule


@pytest.mark.parametrize(
    "language, text",
    [
        ("es", "Genial, ya funciona el router"),
        ("pt", "Que maravilha, chegou antes do prazo"),
        ("en", "Great, it works now"),
        ("es", "se arregló solo, gracias por eso"),
        ("pt", "problema resolvido, parabéns"),
        ("en", "it works now, thanks a lot"),
        ("pt", "tudo funcionando de novo, valeu"),
    ],
)
def test_praise_beside_good_news_is_no_sarcasm(language, text):
    assert lexicon_score(text, language) > 0


@pytest.mark.parametrize(
    "language, text, expected",
    [
        ("es", "¿Cuál es la mejor tarifa para mí?", "neutral"),
        ("es", "quisiera saber si funciona con mi móvil", "neutral"),
        ("pt", "Qual é o melhor plano pra mim?", "neutral"),
        ("pt", "Quanto tempo demora a troca?", "neutral"),  # "demora" is what is asked about
        ("en", "Which is the best plan for a family?", "neutral"),
        ("en", "I'd like to upgrade to the better plan", "neutral"),
        # thanks stay thanks, and a question can still be a complaint
        ("es", "¿me ayudan con la factura? gracias!", "positive"),
        ("en", "can you check it? thanks!", "positive"),
        ("es", "¿por qué me cobraron dos veces??", "negative"),
    ],
)
def test_questions_and_requests_with_positive_words_stay_neutral(language, text, expected):
    assert analyse(text, language, backend="lexicon").label == expected


SUPPORT_RULES = {
    # a support phrase hides VADER's reading of its words the other way ("helps", "promising")
    "a complaint phrase outweighs its kind-looking words": [
        ("en", "nobody helps, I need it sorted today", "negative"),
        ("en", "you keep promising a refund", "negative"),
    ],
    "the same thing again and again (keep + -ing)": [
        ("en", "the router keeps rebooting", "negative"),
        ("en", "you keep getting better", "positive"),
    ],
    "nothing but X is only X": [
        ("en", "nothing but errors with this app", "negative"),
        ("en", "nothing but praise for your installers", "positive"),
    ],
    "a neutral phrase has no feeling": [
        ("en", "no need to call me back, I'll wait for the email", "neutral"),
    ],
    "a question for information names trouble without complaining": [
        ("en", "does the guarantee cover a cracked screen?", "neutral"),
        ("en", "what if the parcel is stolen from my porch?", "neutral"),
        ("en", "can I talk to a manager about a bulk order?", "neutral"),
        ("es", "si se rompe la pantalla la garantía la cubre?", "neutral"),
        ("pt", "o plano cobre aparelho quebrado?", "neutral"),
        # ... but a question asked in anger stays a complaint
        ("en", "how can you charge me twice?", "negative"),
    ],
    "why ...?? is a complaint, a calm why is not": [
        ("en", "why is my parcel in another city??", "negative"),
        ("en", "why does the app need my location?", "neutral"),
    ],
    "asking for someone above": [
        ("en", "get me a supervisor", "negative"),
        ("en", "this is the last straw", "negative"),
    ],
    "the account shut, the parcel soaked or driven off, promises broken": [
        ("en", "my account got frozen out of nowhere", "negative"),
        ("en", "the box came soaked", "negative"),
        ("en", "the courier drove off with my parcel", "negative"),
        ("en", "it never happened", "negative"),
        ("es", "llegó todo mojado", "negative"),
        ("pt", "veio tudo molhado", "negative"),
        ("es", "nunca me llamaron", "negative"),
        ("pt", "nunca retornaram meu contato", "negative"),
        ("pt", "erraram o pedido e ainda querem que eu pague a troca", "negative"),
    ],
    "passed from agent to agent": [
        ("en", "three different agents, three different answers", "negative"),
    ],
    "promises kept, trouble spared, praise VADER lacks": [
        ("es", "vinieron cuando prometieron", "positive"),
        ("pt", "chegaram na hora que prometeram", "positive"),
        ("es", "ni un dolor de cabeza desde el cambio", "positive"),
        ("pt", "nenhuma dor de cabeça com vcs", "positive"),
        ("es", "el técnico fue muy serio y puntual", "positive"),
    ],
}


@pytest.mark.parametrize(
    "rule, language, text, expected",
    [(rule, *case) for rule, cases in SUPPORT_RULES.items() for case in cases],
)
def test_support_chat_rules_on_fixed_sentences(rule, language, text, expected):
    # The rules' own reading; the learned layer that weighs it is tested on its own.
    assert label_for(lexicon_score(text, language), 0.05) == expected, rule


def test_lexicon_endings_and_neutral_phrases():
    lexicon = lexicons.parse_lexicon(["you keep ~ing\t-1.5", "=no need\t0"], language="en")
    assert lexicon.phrases["you"][0].words == ("you", "keep", "~ing")
    assert lexicon.phrases["no"][0].neutral and lexicon.phrases["no"][0].valence == 0
    assert "no need" not in lexicon.vader_overrides
    with pytest.raises(lexicons.LexiconError, match="cannot open with an ending"):
        lexicons.parse_lexicon(["~ing\t-1.0"])


def test_chat_shorthand_reads_like_the_word_it_stands_for():
    assert pt("n gostei do atendimento") == pt("não gostei do atendimento") < 0
    assert es("toy harto de esperar") == es("estoy harto de esperar") < 0


def test_lexicon_stems_and_alternatives_inside_phrases():
    lexicon = lexicons.parse_lexicon(["estrope~\t-2.0", "faz * dia[,s] que\t-1.5"])
    assert lexicon.stems == [("estrope", -2.0)]
    assert [p.words for p in lexicon.phrases["faz"]] == [
        ("faz", "*", "dia", "que"),
        ("faz", "*", "dias", "que"),
    ]


def test_every_lexicon_word_derived_from_vader_names_a_real_vader_entry():
    for language in ("es", "pt", "en"):
        lexicons.lexicon_for.cache_clear()
        lexicon = lexicons.lexicon_for(language)  # raises LexiconError on an unknown gloss
        assert lexicon.words or lexicon.phrases
    with pytest.raises(lexicons.LexiconError, match="VADER has no entry"):
        lexicons.parse_lexicon(["palabra\t@notawordinvader"])


# ------------------------------------------------------------------ measured on the set


def _rows(split: str | None = None) -> list[tuple[str, str, str, str]]:
    lines = EVAL_FILE.read_text(encoding="utf-8").splitlines()
    assert lines[0].split("\t") == ["label", "lang", "split", "text"]
    rows = [tuple(line.split("\t")) for line in lines[1:] if line]
    return [r for r in rows if split is None or r[2] == split]


def test_the_labelled_set_is_balanced_with_at_least_100_messages_a_language():
    rows = _rows()
    for lang in ("en", "es", "pt"):
        labels = [label for label, code, _, _ in rows if code == lang]
        assert len(labels) >= 100
        counts = {label: labels.count(label) for label in ("negative", "neutral", "positive")}
        # Within 10 % of each other: the newer held-out splits carry a few more complaints
        # than other messages, since recall is measured on the complaints alone.
        assert min(counts.values()) >= 0.90 * max(counts.values()), counts


def test_the_rules_reach_the_targets_on_their_tuning_part():
    """The `dev` part is the one the lexicons and rules were tuned on: a regression guard of
    the rules' own reading, before the learned layer weighs it."""
    for language in ("en", "es", "pt"):
        rows = [(label, text) for label, lang, _, text in _rows("dev") if lang == language]
        negatives = [text for label, text in rows if label == "negative"]
        others = [text for label, text in rows if label != "negative"]
        escalated = [
            t for t in negatives if label_for(lexicon_score(t, language), 0.05) == "negative"
        ]
        false = [t for t in others if label_for(lexicon_score(t, language), 0.05) == "negative"]
        assert len(escalated) >= 0.90 * len(negatives), (language, set(negatives) - set(escalated))
        assert len(false) <= 0.05 * len(others), (language, false)


def test_the_offline_default_reaches_the_targets_on_the_whole_set():
    """Every split together, the held-out ones included: a regression guard of the learned
    table shipped with the rules (its honest figures, per split, are in bench/RESULTS.md)."""
    rows = [(label, lang, text) for label, lang, _, text in _rows(None)]
    for result in evaluate(rows, backend="lexicon").values():
        assert result.recall >= 0.90, result.line()
        assert result.false_escalation <= 0.05, result.line()


def test_on_the_held_out_parts_the_offline_default_beats_vader():
    # Every held-out split together: on one split of 36 messages a single message is 4 %.
    rows = [(lab, lang, t) for lab, lang, split, t in _rows() if split.startswith("heldout")]
    ours = evaluate(rows, backend="lexicon")
    theirs = evaluate(rows, backend="vader")
    for lang in ("en", "es", "pt"):
        assert ours[lang].recall >= theirs[lang].recall + 0.25, (ours[lang], theirs[lang])
        assert ours[lang].false_escalation <= 0.05, ours[lang].line()


LAST_LINE = re.compile(
    r"^lang=(en|es|pt) n=(\d+) accuracy=\d\.\d\d recall=\d\.\d\d false_escalation=\d\.\d\d$"
)


def test_the_eval_command_ends_with_one_line_per_language(runner):
    result = runner.invoke(args=["chats", "sentiment-eval", str(EVAL_FILE), "--compare"])
    assert result.exit_code == 0, result.output
    lines = result.output.strip().splitlines()
    last = [LAST_LINE.match(line) for line in lines[-3:]]
    assert all(last), lines[-3:]
    assert [m.group(1) for m in last] == ["en", "es", "pt"]
    assert all(int(m.group(2)) >= 100 for m in last)
    assert "backend=vader" in result.output and "backend=lexicon" in result.output


def test_the_eval_command_explains_a_bad_file(runner, tmp_path):
    headless = tmp_path / "headless.tsv"
    headless.write_text("negative\tes\tfatal\n", encoding="utf-8")
    result = runner.invoke(args=["chats", "sentiment-eval", str(headless)])
    assert result.exit_code != 0 and "label, lang and text" in result.output
    bad_label = tmp_path / "bad.tsv"
    bad_label.write_text("label\tlang\ttext\nangry\tes\tfatal\n", encoding="utf-8")
    result = runner.invoke(args=["chats", "sentiment-eval", str(bad_label)])
    assert result.exit_code != 0 and "bad.tsv:2" in result.output
    assert "Traceback" not in result.output


# ------------------------------------------------------------------ the LLM backend


@pytest.fixture
def fake_llm(app):
    fake = FakeOpenAI(Script()).start()
    app.config.update(
        OPENAI_BASE_URL=fake.base_url,
        OPENAI_API_KEY="test-key",
        SENTIMENT_BACKEND="llm",
        SENTIMENT_LLM_TIMEOUT=1.0,
    )
    yield fake
    fake.stop()


def _sentiment_requests(fake: FakeOpenAI) -> list[dict]:
    return [r.body for r in fake.records if not r.body.get("stream")]


def _visitor_messages(db, chat_id: int) -> list[Message]:
    db.session.expire_all()
    return list(
        db.session.scalars(
            select(Message)
            .where(Message.chat_id == chat_id, Message.sender == "visitor")
            .order_by(Message.id)
        )
    )


def _analyzed_backends(db, tenant_id: int) -> list[str]:
    return [
        e.payload["backend"]
        for e in db.session.scalars(
            select(OutboxEvent).where(
                OutboxEvent.tenant_id == tenant_id, OutboxEvent.topic == "message.analyzed"
            )
        )
    ]


def test_a_burst_of_messages_is_rated_in_one_json_request(app, db, worker, factory, fake_llm):
    tenant = factory.tenant()
    fake_llm.script.json_reply = json.dumps(
        {"results": [{"id": 0, "score": -0.8}, {"id": 1, "score": 0.0}, {"id": 2, "score": 0.9}]}
    )
    chat = chats.start_chat(tenant.id, visitor_id="visitor-burst-1")  # no agent: no replies
    for text in ("quero cancelar isso", "meu pedido é 55102", "mas obrigado pela atenção"):
        chats.add_message(chat, "visitor", text)
    db.session.commit()
    drain(app)

    requests = _sentiment_requests(fake_llm)
    assert len(requests) == 1, requests
    sent = json.loads(requests[0]["messages"][-1]["content"])["messages"]
    assert [m["text"] for m in sent] == [
        "quero cancelar isso",
        "meu pedido é 55102",
        "mas obrigado pela atenção",
    ]
    assert requests[0]["response_format"] == {"type": "json_object"}
    messages = _visitor_messages(db, chat.id)
    assert [m.sentiment_label for m in messages] == ["negative", "neutral", "positive"]
    assert [m.language for m in messages] == ["pt", "pt", "pt"]
    assert messages[0].escalation_reason == "negative \u22120.80"
    assert _analyzed_backends(db, tenant.id) == ["llm", "llm", "llm"]


@pytest.mark.parametrize(
    "script",
    [
        Script(fail_first=10, fail_status=500),
        Script(json_reply="I think it is rather negative"),
        Script(json_reply=json.dumps({"results": [{"id": 0, "score": "bad"}]})),
        Script(stall_seconds=5.0),
    ],
    ids=["server-error", "not-json", "wrong-shape", "timeout"],
)
def test_when_the_model_fails_the_offline_lexicon_answers(
    app, db, worker, factory, fake_llm, script
):
    fake_llm.script = script
    tenant = factory.tenant()
    chat = chats.start_chat(tenant.id, visitor_id="visitor-fallback")
    chats.add_message(chat, "visitor", "Isso é um absurdo, vou reclamar no Procon")
    db.session.commit()
    started = time.monotonic()
    drain(app)
    assert time.monotonic() - started < 4.5  # the short timeout, not the model's stall
    [message] = _visitor_messages(db, chat.id)
    assert message.sentiment_label == "negative" and message.language == "pt"
    assert message.escalation_reason.startswith("negative \u2212")
    assert _analyzed_backends(db, tenant.id) == ["lexicon"]
    assert _sentiment_requests(fake_llm), "the model was asked first"


def test_a_server_without_json_mode_is_asked_again_without_it(app, db, worker, factory, fake_llm):
    fake_llm.script = Script(
        fail_first=1,
        fail_status=400,
        json_reply=json.dumps({"results": [{"id": 0, "score": -0.6}]}),
    )
    tenant = factory.tenant()
    chat = chats.start_chat(tenant.id, visitor_id="visitor-no-json-mode")
    chats.add_message(chat, "visitor", "o pedido chegou, mas veio quebrado")
    db.session.commit()
    drain(app)
    first, second = _sentiment_requests(fake_llm)
    assert "response_format" in first and "response_format" not in second
    [message] = _visitor_messages(db, chat.id)
    assert message.sentiment_score == -0.6 and _analyzed_backends(db, tenant.id) == ["llm"]


# ------------------------------------------------------------------ escalation phrases


def _escalations(db, tenant_id: int) -> list[dict]:
    return [
        e.payload
        for e in db.session.scalars(
            select(OutboxEvent).where(
                OutboxEvent.tenant_id == tenant_id, OutboxEvent.topic == "escalation.triggered"
            )
        )
    ]


def test_a_tenant_phrase_escalates_whatever_the_sentiment(app, db, worker, factory):
    with_rule, without_rule = factory.tenant("With rule"), factory.tenant("Without")
    db.session.add(EscalationRule(tenant_id=with_rule.id, language="es", phrase="reembolso"))
    db.session.add(EscalationRule(tenant_id=with_rule.id, language="any", phrase="reclamação"))
    db.session.commit()
    text = "Muchas gracias, ¿cómo pido el REEMBOLSO?"  # polite: the sentiment alone is not negative
    chat = chats.start_chat(with_rule.id, visitor_id="visitor-rule-1")
    other = chats.start_chat(without_rule.id, visitor_id="visitor-rule-2")
    chats.add_message(chat, "visitor", text)
    chats.add_message(chat, "visitor", "quero abrir uma reclamacao formal, obrigado")
    chats.add_message(other, "visitor", text)
    db.session.commit()
    drain(app)

    first, second = _visitor_messages(db, chat.id)
    assert first.sentiment_label != "negative"
    assert first.escalation_reason == "phrase: reembolso"
    assert second.escalation_reason == "phrase: reclamação"  # accents need not match
    assert [p["reason"] for p in _escalations(db, with_rule.id)] == [
        "phrase: reembolso",
        "phrase: reclamação",
    ]
    [unruled] = _visitor_messages(db, other.id)
    assert unruled.escalation_reason is None and _escalations(db, without_rule.id) == []


def test_a_phrase_for_another_language_or_a_partial_word_does_not_match(app, db, worker, factory):
    tenant = factory.tenant()
    db.session.add(EscalationRule(tenant_id=tenant.id, language="pt", phrase="reembolso"))
    db.session.add(EscalationRule(tenant_id=tenant.id, language="any", phrase="procon"))
    db.session.commit()
    chat = chats.start_chat(tenant.id, visitor_id="visitor-rule-3")
    chats.add_message(chat, "visitor", "¿Cuánto tarda el reembolso?")  # Spanish
    chats.add_message(chat, "visitor", "what is proconsul?")
    db.session.commit()
    drain(app)
    assert [m.escalation_reason for m in _visitor_messages(db, chat.id)] == [None, None]


def test_the_operator_sees_the_language_and_the_reason(app, db, worker, factory, client):
    tenant = factory.tenant()
    admin = factory.user(tenant, role="admin")
    chat = chats.start_chat(tenant.id, visitor_id="visitor-view-1")
    chats.add_message(chat, "visitor", "Llevo tres días esperando y nadie me contesta")
    db.session.commit()
    drain(app)
    [message] = _visitor_messages(db, chat.id)
    assert message.escalation_reason.startswith("negative \u2212")
    login(client, admin)
    page = client.get(f"/chats/{chat.id}").get_data(as_text=True)
    assert ">es</span>" in page
    assert f"escalated: {message.escalation_reason}" in page
    [note] = db.session.scalars(
        select(Notification).where(
            Notification.recipient_id == admin.id, Notification.type == "escalation"
        )
    )
    assert note.title == "A visitor is unhappy"
    assert note.body.startswith(f"{message.escalation_reason} · Llevo tres días")


# ------------------------------------------------------------------ the admin page


def _csrf(page: bytes) -> str:
    match = re.search(rb'name="csrf_token" type="hidden" value="([^"]+)"', page) or re.search(
        rb'name="csrf_token" value="([^"]+)"', page
    )
    assert match, "no CSRF token on the page"
    return match.group(1).decode()


def test_admins_edit_their_tenants_phrases_with_csrf(app, db, factory, client):
    tenant, other_tenant = factory.tenant("Mine"), factory.tenant("Theirs")
    admin = factory.user(tenant, role="admin")
    theirs = EscalationRule(tenant_id=other_tenant.id, language="pt", phrase="cobrança indevida")
    db.session.add(theirs)
    db.session.commit()
    login(client, admin)

    page = client.get("/chats/escalation")
    assert page.status_code == 200 and "cobrança indevida" not in page.get_data(as_text=True)
    token = _csrf(page.data)
    refused = client.post("/chats/escalation", data={"phrase": "reembolso", "language": "es"})
    assert refused.status_code == 400  # no CSRF token
    added = client.post(
        "/chats/escalation",
        data={"phrase": "  Hoja de  Reclamaciones ", "language": "es", "csrf_token": token},
    )
    assert added.status_code == 303
    again = client.post(
        "/chats/escalation",
        data={"phrase": "hoja de reclamaciones", "language": "es", "csrf_token": token},
    )
    assert again.status_code == 400 and "already a phrase" in again.get_data(as_text=True)
    bad_language = client.post(
        "/chats/escalation", data={"phrase": "x", "language": "klingon", "csrf_token": token}
    )
    assert bad_language.status_code == 400
    rules = db.session.scalars(select(EscalationRule).where(EscalationRule.tenant_id == tenant.id))
    assert [(r.language, r.phrase) for r in rules] == [("es", "hoja de reclamaciones")]

    # Another tenant's rule is not there to pause or delete.
    assert (
        client.post(f"/chats/escalation/{theirs.id}/delete", data={"csrf_token": token}).status_code
        == 404
    )
    assert (
        client.post(f"/chats/escalation/{theirs.id}/toggle", data={"csrf_token": token}).status_code
        == 404
    )
    assert db.session.get(EscalationRule, theirs.id) is not None

    suggested = client.post("/chats/escalation/suggested", data={"csrf_token": token})
    assert suggested.status_code == 303
    phrases = {
        r.phrase
        for r in db.session.scalars(
            select(EscalationRule).where(EscalationRule.tenant_id == tenant.id)
        )
    }
    assert {"reembolso", "advogado", "procon", "cancel my account"} <= phrases


def test_only_admins_reach_the_phrases(app, db, factory, client):
    tenant = factory.tenant()
    member = factory.user(tenant, role="agent")
    login(client, member)
    assert client.get("/chats/escalation").status_code == 403


# ------------------------------------------------------------------ the reply's language


def test_the_system_prompt_speaks_the_visitors_language():
    history = [("visitor", "Llevo tres días esperando, es una vergüenza"), ("assistant", "…")]
    system = build_messages("You are a helpful assistant.", "empathetic", history)[0]["content"]
    assert "Responde siempre en español" in system
    assert "El visitante parece molesto" in system and "The visitor seems upset" not in system
    history = [("visitor", "Meu pedido não chegou"), ("visitor", "ok")]  # a short last message
    system = build_messages("", "friendly", history)[0]["content"]
    assert "Responda sempre em português" in system and "bom humor" in system


def test_the_assistant_answers_in_spanish(app, db, worker, factory):
    fake = FakeOpenAI(Script(reply="Lo siento mucho, lo revisamos ahora.")).start()
    app.config.update(OPENAI_BASE_URL=fake.base_url, OPENAI_API_KEY="test-key")
    try:
        tenant = factory.tenant()
        db.session.add(Agent(tenant_id=tenant.id, name="Ayuda", is_default=True))
        db.session.commit()
        chat = chats.start_chat(tenant.id, visitor_id="visitor-reply-es")
        chats.add_message(chat, "visitor", "Hola, ¿me pueden ayudar con la factura de octubre?")
        db.session.commit()
        drain(app)
        streamed = [r.body for r in fake.records if r.body.get("stream")]
        assert streamed, "the reply was not generated"
        system = streamed[0]["messages"][0]["content"]
        assert "Responde siempre en español" in system
    finally:
        fake.stop()
        app.config.update(OPENAI_BASE_URL=None, OPENAI_API_KEY=None)


@pytest.mark.integration
def test_concurrent_handlers_rate_each_message_of_a_burst_once(prod_app, prod_worker, prod_factory):
    """PostgreSQL, Redis and four worker threads: the handlers of a burst's messages run at
    once; the row locks make them split the burst, never rate a message twice."""
    from extensions import db

    fake = FakeOpenAI(
        Script(json_reply=json.dumps({"results": [{"id": i, "score": -0.5} for i in range(4)]}))
    ).start()
    prod_app.config.update(
        OPENAI_BASE_URL=fake.base_url, OPENAI_API_KEY="test-key", SENTIMENT_BACKEND="llm"
    )
    try:
        tenant = prod_factory.tenant()
        texts = ["hola", "sigo esperando", "nadie me contesta", "quiero la hoja de reclamaciones"]
        with prod_app.app_context():
            chat = chats.start_chat(tenant.id, visitor_id="visitor-pg-burst")
            for text in texts:
                chats.add_message(chat, "visitor", text)
            db.session.commit()
            chat_id = chat.id

            def analysed() -> list[Message]:
                db.session.expire_all()
                rows = _visitor_messages(db, chat_id)
                return rows if all(m.sentiment_label for m in rows) else []

            deadline = time.monotonic() + 20
            while not analysed() and time.monotonic() < deadline:
                time.sleep(0.1)
            messages = analysed()
            assert messages, "the burst was not analysed"
            assert {m.sentiment_label for m in messages} == {"negative"}
            sent = [
                m["text"]
                for body in _sentiment_requests(fake)
                for m in json.loads(body["messages"][-1]["content"])["messages"]
            ]
            assert sorted(sent) == sorted(texts)  # each message asked about exactly once
            assert len(_analyzed_backends(db, tenant.id)) == 4
            db.session.remove()
    finally:
        fake.stop()
