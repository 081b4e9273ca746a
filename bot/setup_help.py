"""The message shown when the bot cannot start because it has no Discord token."""

# View Channel, Send Messages, Embed Links, Attach Files, Read Message History.
BOT_PERMISSIONS = 1024 + 2048 + 16384 + 32768 + 65536

SETUP_MESSAGE = f"""\
The bot needs a Discord bot token before it can start.

1. Open https://discord.com/developers/applications and press "New Application".
2. On the "Bot" page press "Reset Token", copy the token and put it in a file named .env
   next to this README:   DISCORD_TOKEN=<your token>
   (or export DISCORD_TOKEN in the environment). Keep it secret; it is never logged.
3. Intents: none of the privileged intents are needed. The bot reads the photos people send in
   direct messages, and Discord exempts DMs with the app from the Message Content intent.
4. Invite the bot to a server with the scopes "bot" and "applications.commands":
   https://discord.com/oauth2/authorize?client_id=<APPLICATION_ID>&scope=bot+applications.commands&permissions={BOT_PERMISSIONS}
   (<APPLICATION_ID> is on the "General Information" page.) People who share that server with the
   bot can then DM it. To let people use it without a shared server, enable "User Install" on the
   "Installation" page and share the install link shown there.
5. Run `make run` again (with Docker: `docker compose up -d`; the .env goes next to docker-compose.yml). For a CPU-only demo without downloading a model, also set
   BASE_MODEL=tiny DEVICE=cpu TRAIN_RESOLUTION=64 CLASS_IMAGES=8 (pictures are noise; every step runs).
"""
