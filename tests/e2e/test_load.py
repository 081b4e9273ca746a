"""A bounded load test on loopback: 50 people, 10 trainings and 200 /imagine requests through the fake
Discord, against two Celery workers on the CPU with the tiny model.

Checks that nothing is lost (every request gets its pictures or a reason), that every picture is made
with its requester's own model, and that queue positions only go down. The figures (throughput,
latency percentiles) are logged; see them with `-o log_cli=true --log-cli-level=INFO | grep measured`.
"""

from __future__ import annotations

import asyncio
import logging
import re
import statistics
import time

import pytest

from storage import generations_db, models_db, users_db
from tests.e2e.harness import (
    e2e_settings,
    last_text,
    ready_to_train,
    running_bot,
    samples_message,
    start_training,
)
from tests.polling import wait_until

pytestmark = pytest.mark.slow
log = logging.getLogger(__name__)

PEOPLE, TRAINERS, REQUESTS = 50, 10, 200


def positions(message) -> list[int]:
    """Every queue position a message showed, oldest first."""
    return [int(m[1]) for v in message.history if (m := re.search(r"[Pp]osition(?: in the queue:)? (\d+)", v.content))]


async def test_fifty_people_ten_trainings_two_hundred_pictures_on_two_workers(fake, tmp_path, redis_url,
                                                                               celery_workers):
    for name in ("w1", "w2"):
        celery_workers.start(name)
    people = [fake.add_user(f"user{i:02d}") for i in range(PEOPLE)]
    trainers = people[:TRAINERS]
    settings = e2e_settings(fake, tmp_path, job_backend="celery", redis_url=redis_url, train_steps=12,
                            train_preview_every=0, max_queued_generations=REQUESTS, max_queued_jobs=REQUESTS)
    async with running_bot(fake, settings) as run:
        started = time.monotonic()
        for i, person in enumerate(trainers):
            await ready_to_train(fake, person, f"zqload{i:02d}")
        await asyncio.gather(*(start_training(fake, person) for person in trainers))
        await fake.wait_for(lambda: all(samples_message(fake, p) for p in trainers), timeout=600)
        trained_s = time.monotonic() - started
        # The other 40 people trained earlier: each gets a model of their own (a copy of a fresh LoRA).
        db, files = run.store.db, run.store.files
        for i, person in enumerate(people[TRAINERS:]):
            source = await models_db.get_active_model(db, trainers[i % TRAINERS].id)
            lora = files.read(source.lora_path, source.owner)
            await users_db.set_handle(db, person.id, f"zqseed{i:02d}", "person")
            await models_db.add_model(db, person.id, None, files.write(person.id, "models", lora, ".safetensors"),
                                      source.base_model, {**source.metadata, "handle": f"zqseed{i:02d}"})

        asked: list[tuple[object, object, float]] = []
        started = time.monotonic()
        for n in range(REQUESTS):
            person = people[n % PEOPLE]
            interaction = await fake.invoke_command(person, "imagine", {"prompt": f"scene {n}", "count": 1})
            asked.append((person, interaction, time.time()))

        def answered(interaction) -> bool:
            return interaction.original is not None and bool(interaction.original.attachments)

        await fake.wait_for(lambda: all(answered(i) for _, i, _ in asked), timeout=900)
        wall = time.monotonic() - started

        latencies = []
        for person, interaction, sent in asked:
            original = interaction.original
            assert len(original.attachments) == 1, last_text(interaction)
            generation = await wait_until(lambda o=original: generations_db.generation_for_message(db, o.id))
            model = await models_db.get_model(db, generation.model_id)
            assert generation.owner == person.id and model.owner == person.id  # made with their own model
            latencies.append(original.versions[-1].at.timestamp() - sent)
            shown = positions(original)
            assert shown == sorted(shown, reverse=True), shown  # queue positions only go down
        assert len({id(i.original) for _, i, _ in asked}) == REQUESTS  # one answer each, none lost
        log.info("measured: %d trainings in %.1f s; %d pictures for %d people in %.1f s = %.2f pictures/s, "
                 "latency p50 %.2f s, p95 %.2f s", TRAINERS, trained_s, REQUESTS, PEOPLE, wall, REQUESTS / wall,
                 statistics.median(latencies), statistics.quantiles(latencies, n=20)[18])
    assert fake.unknown_routes == []
