"""A minimal Django project whose app embeds gproxy (relayapp); no database."""

SECRET_KEY = "embedding-tests-only"
DEBUG = True
ALLOWED_HOSTS = ["127.0.0.1", "localhost"]
INSTALLED_APPS = ["relayapp"]
ROOT_URLCONF = "site_urls"
DATABASES = {}
USE_TZ = True
