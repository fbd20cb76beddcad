"""Site files are validated up front; every error names the file, the key and what was expected."""
import pytest
import yaml

from appliance import paths
from appliance.errors import ConfigError
from appliance.site import load_site

ROLES = ["filter", "frontend", "mailstore"]


def write_site(tmp_path, mutate):
    data = yaml.safe_load(paths.EXAMPLE_SITE.read_text())
    mutate(data)
    p = tmp_path / "site.yaml"
    p.write_text(yaml.safe_dump(data))
    return p


def error_of(tmp_path, mutate) -> str:
    p = write_site(tmp_path, mutate)
    with pytest.raises(ConfigError) as exc:
        load_site(p, ROLES)
    assert str(p) in exc.value.message
    return exc.value.message


def test_example_site_is_valid():
    site = load_site(paths.EXAMPLE_SITE, ROLES)
    assert site.roles == ["filter", "frontend", "mailstore"]
    assert [n.name for n in site.nodes_with_role("filter")] == ["filter1", "filter2"]


def test_wrong_type_names_the_key_path(tmp_path):
    msg = error_of(tmp_path, lambda d: d["nodes"][1].update(address="not-an-ip"))
    assert "nodes[1].address" in msg and "IPv4" in msg


def test_unknown_key_is_an_error(tmp_path):
    msg = error_of(tmp_path, lambda d: d["filter"].update(engien="rspamd"))
    assert "filter.engien: unknown key" in msg


def test_missing_required_key(tmp_path):
    msg = error_of(tmp_path, lambda d: d.pop("domain"))
    assert "domain: required key is missing" in msg


def test_unknown_role(tmp_path):
    msg = error_of(tmp_path, lambda d: d["nodes"][0].update(role="webmail"))
    assert "nodes[0].role: unknown role 'webmail'" in msg
    assert "frontend" in msg  # says what was expected


def test_duplicate_node_names(tmp_path):
    msg = error_of(tmp_path, lambda d: d["nodes"][2].update(name="filter1"))
    assert "nodes[2].name: duplicate node name 'filter1'" in msg


def test_address_outside_cluster_network(tmp_path):
    msg = error_of(tmp_path, lambda d: d["nodes"][0].update(address="192.0.2.1"))
    assert "nodes[0].address" in msg and "outside network.cluster" in msg


def test_backup_pair_must_name_mailstores(tmp_path):
    msg = error_of(tmp_path, lambda d: d["backups"][0].update(backup="filter1"))
    assert "backups[0].backup: 'filter1' has role 'filter'; expected a mailstore" in msg


def test_a_primary_whose_backup_account_name_would_be_too_long_is_refused(tmp_path):
    long = "store-" + "x" * 22  # 28 characters: mcb-<it> would be 32

    def rename(d):
        d["nodes"][3]["name"] = long
        d["backups"][0]["primary"] = long
        for u in d["users"]:
            u.pop("mailstore", None)
    msg = error_of(tmp_path, rename)
    assert f"backups[0].primary: '{long}' has 28 characters" in msg and "at most 27" in msg


def test_plaintext_password_refused(tmp_path):
    msg = error_of(tmp_path, lambda d: d["users"][0].update(password_hash="hunter2"))
    assert "users[0].password_hash" in msg and "strong hash" in msg


def test_short_queue_lifetime_refused(tmp_path):
    msg = error_of(tmp_path, lambda d: d["filter"].update(queue_lifetime="1d"))
    assert "filter.queue_lifetime" in msg and "at least 5d" in msg


def test_user_outside_site_domains(tmp_path):
    msg = error_of(tmp_path, lambda d: d["users"][0].update(address="eve@elsewhere.test"))
    assert "users[0].address" in msg


def test_not_yaml(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("nodes: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_site(p, ROLES)


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="site file not found"):
        load_site(tmp_path / "nope.yaml", ROLES)


def test_site_round_trips_through_json():
    site = load_site(paths.EXAMPLE_SITE, ROLES)
    again = type(site).model_validate_json(site.model_dump_json())
    assert again == site


def test_user_on_a_backup_mailstore_refused(tmp_path):
    msg = error_of(tmp_path, lambda d: d["users"][0].update(mailstore="store2"))
    assert "users[0].mailstore" in msg and "backup" in msg


def test_user_on_a_non_mailstore_refused(tmp_path):
    msg = error_of(tmp_path, lambda d: d["users"][0].update(mailstore="filter1"))
    assert "users[0].mailstore" in msg and "not a mailstore" in msg


def test_mailboxes_default_to_the_first_primary_mailstore():
    site = load_site(paths.EXAMPLE_SITE, ROLES)
    assert {site.mailstore_of(u) for u in site.users} == {"store1"}  # store2 is store1's backup


def test_frontend_ports_are_smtp_or_submission_and_listed_once(tmp_path):
    msg = error_of(tmp_path, lambda d: d["frontend"].update(ports=[25, 26]))
    assert "frontend.ports[1]" in msg
    msg = error_of(tmp_path, lambda d: d["frontend"].update(ports=[25, 587, 587]))
    assert "frontend.ports" in msg and "twice" in msg


def test_every_domain_gets_postmaster_and_abuse_unless_the_site_has_its_own(tmp_path):
    site = load_site(write_site(tmp_path, lambda d: d.update(domains=["example.org"], aliases=[
        {"address": "abuse@example.org", "to": ["bob@example.test"]}])), ROLES)
    assert site.all_aliases == {
        "abuse@example.org": ["bob@example.test"],
        "postmaster@example.test": ["alice@example.test"], "abuse@example.test": ["alice@example.test"],
        "postmaster@example.org": ["alice@example.test"]}
    named = load_site(write_site(tmp_path, lambda d: d.update(postmaster="ops@elsewhere.test")), ROLES)
    assert named.all_aliases["postmaster@example.test"] == ["ops@elsewhere.test"]


@pytest.mark.parametrize("alias,problem", [
    ({"address": "team@elsewhere.test", "to": ["alice@example.test"]}, "aliases[1].address: domain 'elsewhere.test'"),
    ({"address": "bob@example.test", "to": ["alice@example.test"]}, "aliases[1].address: bob@example.test is a user"),
    ({"address": "team@example.test", "to": ["alice@example.test"]}, "aliases[1].address: team@example.test is listed twice"),
    ({"address": "sales@example.test", "to": ["nobody@example.test"]},
     "aliases[1].to[0]: nobody@example.test is no user or alias of this site"),
    ({"address": "sales@example.test", "to": []}, "aliases[1].to"),
    ({"address": "sales@example.test", "to": ["|/bin/sh"]}, "aliases[1].to[0]"),
])
def test_a_bad_alias_is_refused_with_its_place(tmp_path, alias, problem):
    assert problem in error_of(tmp_path, lambda d: d["aliases"].append(alias))


@pytest.mark.parametrize("catch_all,problem", [
    ([{"domain": "elsewhere.test", "to": ["alice@example.test"]}], "catch_all[0].domain: 'elsewhere.test' is not one"),
    ([{"domain": "example.com", "to": ["carol@example.test"]}, {"domain": "example.com", "to": ["bob@example.test"]}],
     "catch_all[1].domain: example.com has a catch-all already"),
    ([{"domain": "example.com", "to": ["nobody@example.test"]}],
     "catch_all[0].to[0]: nobody@example.test is no user or alias of this site"),
    ([{"domain": "example.com", "to": []}], "catch_all[0].to"),
])
def test_a_bad_catch_all_is_refused_with_its_place(tmp_path, catch_all, problem):
    assert problem in error_of(tmp_path, lambda d: d.update(catch_all=catch_all))


def test_a_catch_all_reaches_the_nodes_as_a_membership_record(tmp_path):
    from appliance.credentials import peers

    site = load_site(write_site(tmp_path, lambda d: d.update(catch_all=[
        {"domain": "example.com", "to": ["carol@example.test", "friend@example.net"]}])), ROLES)
    assert "catchall example.com carol@example.test,friend@example.net\n" in peers(site)
    assert "catchall" not in peers(load_site(paths.EXAMPLE_SITE, ROLES))  # off by default
