"""The offline analyser's learned complaint layer: its features (negation marked as VADER
marks it, contrast, shape), the table it reads, the training command, and what it changes for
a visitor's message: factual complaints escalate, questions about refunds do not."""

from __future__ import annotations

import pytest

from services import sentiment
from services.lexicons import learned
from services.sentiment import NEGATIVE, analyse, detect_language, lexicon_score


def feats(text: str, language: str) -> dict[str, float]:
    return learned.features(text, language, 0.0)


@pytest.mark.parametrize(
    "text, language, negated, plain",
    [
        ("I'm not happy with it", "en", "w:~happy", None),
        ("it didn't work at all", "en", "w:~work", None),
        ("no funciona desde el lunes", "es", "w:~funciona", None),
        ("nao chegou nada ainda", "pt", "w:~chegou", None),  # no accents
        # A negator's reach ends at punctuation and at "y"/"and": the next word is plain.
        ("no, funciona bien", "es", None, "w:funciona"),
        ("not sure and happy to wait", "en", None, "w:happy"),
    ],
)
def test_a_negators_next_words_are_marked_negated(text, language, negated, plain):
    found = feats(text, language)
    if negated:
        assert negated in found
        assert negated.replace("~", "") not in found
    if plain:
        assert plain in found
        assert "w:~" + plain[2:] not in found


def test_features_carry_contrast_shape_and_the_lexicon_score():
    found = learned.features("The tech was nice but it STILL doesn't work!!! 😡", "en", -0.6)
    assert ">still" in found and ">nice" not in found  # the clause after "but" is marked
    assert {"shape:!!", "shape:CAPS", "emoji:-"} <= found.keys()
    assert found["lex"] == -0.6 and "lex:negative" in found
    assert "shape:number" in feats("order 12345 arrived", "en")
    assert "w:<n>" in feats("3 weeks", "en")
    # Typed with and without accents, stretched or not, a word is the same feature.
    assert feats("não", "pt").keys() == feats("nao", "pt").keys()
    assert "w:muuy" in feats("muuuuy mal", "es") and "w:muuy" in feats("muuy mal", "es")


def test_a_table_is_read_like_a_lexicon_and_a_bad_line_is_named():
    table = learned.parse_table(["# comment", "__bias__\t-1", "__threshold__\t0.4", "w:x\t2.5"])
    assert table.bias == -1 and table.threshold == 0.4 and table.weights == {"w:x": 2.5}
    assert table.probability({"w:x": 1.0}) > 0.8 > table.probability({})
    with pytest.raises(learned.TableError, match="learned.tsv:2"):
        learned.parse_table(["__bias__\t-1", "w:x\tmuch"])
    with pytest.raises(learned.TableError, match="__threshold__"):
        learned.parse_table(["__bias__\t-1"])


# Written for this test, not taken from the corpus or the evaluation set: complaints that
# state a fact with no word of feeling, and questions that name the trouble they ask about.
FACTUAL_COMPLAINTS = [
    ("three weeks and my parcel is still sitting in some warehouse", "en"),
    ("you charged my card twice for one order", "en"),
    ("llevo una semana sin poder entrar en mi cuenta", "es"),
    ("me cobraron dos veces el mismo mes", "es"),
    ("já liguei quatro vezes e ninguém resolve", "pt"),
    ("cancelei em março e continuam cobrando", "pt"),
]
NEUTRAL_QUESTIONS = [
    ("how long does a refund take to reach my card?", "en"),
    ("can I cancel an order that has not shipped yet?", "en"),
    ("el reembolso vuelve a la misma tarjeta?", "es"),
    ("cómo puedo cancelar la suscripción?", "es"),
    ("se o produto vier com defeito como faço a troca?", "pt"),
    ("qual o prazo do reembolso?", "pt"),
]


@pytest.mark.parametrize("text, language", FACTUAL_COMPLAINTS)
def test_a_factual_complaint_escalates(text, language):
    result = analyse(text, language)
    assert result.label == NEGATIVE, (text, result)
    assert result.score < 0


@pytest.mark.parametrize("text, language", NEUTRAL_QUESTIONS)
def test_a_question_about_trouble_does_not_escalate(text, language):
    assert analyse(text, language).label != NEGATIVE


def test_without_a_table_the_lexicon_alone_decides(monkeypatch):
    text = "llevo una semana sin poder entrar en mi cuenta"
    monkeypatch.setattr(learned, "table", lambda: None)
    alone = sentiment.offline(text, "es")
    assert alone.score == round(lexicon_score(text, "es"), 4)


def test_the_train_command_writes_a_table_the_analyser_reads(app, tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    lines = ["label\tlang\ttext"]
    for n in range(12):
        lines += [
            f"negative\ten\tthe box {n} arrived broken and nobody answers",
            f"neutral\ten\twhat time do you open on day {n}?",
            f"positive\ten\tthanks a lot, order {n} was perfect",
        ]
    (corpus / "mine.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    out = tmp_path / "table.tsv"
    result = app.test_cli_runner().invoke(
        args=["chats", "sentiment-train", "--corpus", str(corpus), "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    assert "36 messages from 1 files" in result.output
    assert "l2=" in result.output  # progress while it cross-validates
    assert result.output.strip().splitlines()[-1].startswith("lang=en cross-validated recall=")
    table = learned.parse_table(out.read_text(encoding="utf-8").splitlines())
    broken = table.probability(learned.features("the box arrived broken", "en", -0.5))
    question = table.probability(learned.features("what time do you open?", "en", 0.0))
    assert broken >= table.threshold > question


def test_the_train_command_explains_bad_input(app, tmp_path):
    runner = app.test_cli_runner()
    empty = tmp_path / "empty"
    empty.mkdir()
    result = runner.invoke(args=["chats", "sentiment-train", "--corpus", str(empty)])
    assert result.exit_code != 0 and "no .tsv files" in result.output
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "x.tsv").write_text("label\tlang\ttext\nangry\ten\tgrr\n", encoding="utf-8")
    result = runner.invoke(args=["chats", "sentiment-train", "--corpus", str(bad)])
    assert result.exit_code != 0 and "x.tsv:2" in result.output
    assert "Traceback" not in result.output


def test_a_factual_complaint_in_portuguese_escalates_the_chat_with_its_reason(
    app, db, worker, factory
):
    """What an operator sees: the complaint names no feeling, yet the chat is escalated,
    badged, and its reason and the message's language are shown."""
    from models.chats import Chat
    from services import chats
    from tests.conftest import drain, login

    shop = factory.tenant("Loja")
    admin = factory.user(shop, role="admin")
    chat = chats.start_chat(shop.id, visitor_id="visitor-pt")
    calm = chats.start_chat(shop.id, visitor_id="visitor-pt-2")
    for each in (chat, calm):
        each.settings = {**each.settings, "auto_response": False}
    db.session.commit()
    chat_id, calm_id = chat.id, calm.id
    complaint = "cancelei em março e continuam cobrando no meu cartão todo mês"
    chats.add_message(db.session.get(Chat, chat_id), "visitor", complaint)
    chats.add_message(db.session.get(Chat, calm_id), "visitor", "qual o prazo do reembolso?")
    db.session.commit()
    drain(app)
    db.session.expire_all()
    escalated = db.session.get(Chat, chat_id)
    assert escalated.escalated_at is not None
    assert escalated.escalation_reason.startswith("negative \u2212")
    assert db.session.get(Chat, calm_id).escalated_at is None

    page = login(app.test_client(), admin).get(f"/chats/{chat_id}").get_data(as_text=True)
    assert escalated.escalation_reason in page
    assert "Portuguese" in page or ">pt<" in page


def test_an_installation_can_use_a_table_learned_from_its_own_messages(app, tmp_path, caplog):
    text = "the lamp is blue"
    with app.app_context():
        assert analyse(text, "en").label != NEGATIVE
        own = tmp_path / "own.tsv"
        # A table that calls every blue thing a complaint: SENTIMENT_TABLE is what decides.
        own.write_text("__bias__\t-5\n__threshold__\t0.5\nw:blue\t10\n", encoding="utf-8")
        app.config["SENTIMENT_TABLE"] = str(own)
        assert learned.table_path() == own
        assert analyse(text, "en").label == NEGATIVE
        # A broken one is logged and the shipped table answers: messages are still analysed.
        broken = tmp_path / "broken.tsv"
        broken.write_text("w:blue\tten\n", encoding="utf-8")
        app.config["SENTIMENT_TABLE"] = str(broken)
        assert analyse(text, "en").label != NEGATIVE
        assert "broken.tsv cannot be used" in caplog.text
        app.config["SENTIMENT_TABLE"] = str(tmp_path / "missing.tsv")
        assert analyse(text, "en").label != NEGATIVE


def test_the_train_command_writes_the_configured_table(app, tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    lines = ["label\tlang\ttext"]
    for n in range(10):
        lines += [f"negative\ten\tbroken again {n}", f"positive\ten\tthanks {n}, perfect"]
    (corpus / "c.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    target = tmp_path / "installation.tsv"
    app.config["SENTIMENT_TABLE"] = str(target)
    result = app.test_cli_runner().invoke(
        args=["chats", "sentiment-train", "--corpus", str(corpus)]
    )
    assert result.exit_code == 0, result.output
    assert f"wrote {target}" in result.output
    assert learned.parse_table(target.read_text(encoding="utf-8").splitlines()).weights
    result = app.test_cli_runner().invoke(
        args=[
            "chats",
            "sentiment-train",
            "--corpus",
            str(corpus),
            "--out",
            str(tmp_path / "no" / "t.tsv"),
        ]
    )
    assert result.exit_code != 0 and "cannot write" in result.output
    assert "Traceback" not in result.output


@pytest.mark.parametrize(
    "text, language",
    [
        # Markup a visitor pastes (or a hostile one types) is not words of any language.
        ("<img src=x onerror=\"document.title='pwned'\"> no funciona nada!!!", "es"),
        ("mi pedido https://tienda.example.com/pedidos/48213?ref=mail no llegó nunca", "es"),
        ("<b>ainda não chegou</b> o pedido www.loja.example/rastreio/99", "pt"),
    ],
)
def test_markup_and_links_do_not_hide_a_complaint_or_its_language(text, language):
    assert detect_language(text) == language
    assert analyse(text).label == NEGATIVE


def test_an_escalations_score_is_the_lexicons_where_it_read_a_complaint_too():
    text = "esto es una vergüenza, nadie me contesta"
    assert analyse(text, "es").score == round(lexicon_score(text, "es"), 4) < 0
    quiet = "cancelei em março e continuam cobrando no meu cartão todo mês"  # no feeling word
    assert lexicon_score(quiet, "pt") > -0.05
    assert analyse(quiet, "pt").score < -0.5
