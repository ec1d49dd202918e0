from django.urls import path

from relayapp import views

urlpatterns = [path("proxy/", views.proxy)]
