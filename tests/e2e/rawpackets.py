"""Hand-made frames for the host-protection tests; standard library only.

Run as a script inside a network namespace (a container's, the host's, or
an "outside" one the test made), never imported by calicnm::

    nsenter --net=NS -- python -I rawpackets.py COMMAND 'JSON ARGS'

Each command prints one JSON line with what it did or saw.  Frames go out
of one named interface of that namespace only (``AF_PACKET``), or to an
address the caller names (a UDP socket); every wait is bounded by the
``seconds`` it is given.

Commands: ``arp`` (send ARP frames), ``arp_probe`` (ask who has an address,
return the MAC that answered), ``ra`` (send an ICMPv6 router advertisement),
``vxlan`` (send a VXLAN-encapsulated ICMP echo over UDP), ``syn`` (send a TCP
SYN in a raw frame, report the flags of the answer), ``sniff`` (count IPv4
frames from one address to another on some interfaces; prints ``ready``
first).
"""

from __future__ import annotations

import json
import select
import socket
import struct
import sys
import time
from typing import Any

ETH_P_ALL = 0x0003
ETH_P_IP = 0x0800
ETH_P_ARP = 0x0806
ETH_P_IPV6 = 0x86DD
BROADCAST = "ff:ff:ff:ff:ff:ff"
ZERO_MAC = "00:00:00:00:00:00"


def checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def mac_bytes(text: str) -> bytes:
    return bytes.fromhex(text.replace(":", ""))


def mac_text(raw: bytes) -> str:
    return ":".join(f"{b:02x}" for b in raw)


def ether(dst: str, src: str, ethertype: int, payload: bytes) -> bytes:
    return mac_bytes(dst) + mac_bytes(src) + struct.pack("!H", ethertype) + payload


def ipv4(src: str, dst: str, proto: int, payload: bytes, ttl: int = 64) -> bytes:
    header = struct.pack(
        "!BBHHHBBH4s4s",
        0x45,
        0,
        20 + len(payload),
        0x1234,
        0,
        ttl,
        proto,
        0,
        socket.inet_aton(src),
        socket.inet_aton(dst),
    )
    header = header[:10] + struct.pack("!H", checksum(header)) + header[12:]
    return header + payload


def icmp_echo(ident: int, seq: int, data: bytes) -> bytes:
    body = struct.pack("!BBHHH", 8, 0, 0, ident, seq) + data
    return body[:2] + struct.pack("!H", checksum(body)) + body[4:]


def arp(op: int, sha: str, spa: str, tha: str, tpa: str) -> bytes:
    return struct.pack(
        "!HHBBH6s4s6s4s",
        1,
        ETH_P_IP,
        6,
        4,
        op,
        mac_bytes(sha),
        socket.inet_aton(spa),
        mac_bytes(tha),
        socket.inet_aton(tpa),
    )


def send_frames(ifname: str, frames: list[bytes], repeat: int = 1) -> int:
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
    try:
        sock.bind((ifname, 0))
        for _ in range(repeat):
            for frame in frames:
                sock.send(frame)
            time.sleep(0.05)
    finally:
        sock.close()
    return len(frames) * repeat


def listener(ifname: str, ethertype: int) -> socket.socket:
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ethertype))
    sock.bind((ifname, 0))
    sock.settimeout(0.1)
    return sock


# ---- commands -----------------------------------------------------------------------------


def cmd_arp(a: dict[str, Any]) -> dict[str, Any]:
    """``frames``: list of {eth_dst, op, sha, spa, tha, tpa}; sent ``repeat`` times."""
    frames = [
        ether(
            f["eth_dst"], f["sha"], ETH_P_ARP, arp(f["op"], f["sha"], f["spa"], f["tha"], f["tpa"])
        )
        for f in a["frames"]
    ]
    return {"sent": send_frames(a["ifname"], frames, a.get("repeat", 3))}


def cmd_arp_probe(a: dict[str, Any]) -> dict[str, Any]:
    """Who has ``target``?  Asked from ``mac``/``ip``; the MAC that answered, or None."""
    sock = listener(a["ifname"], ETH_P_ARP)
    try:
        request = arp(1, a["mac"], a["ip"], ZERO_MAC, a["target"])
        send_frames(a["ifname"], [ether(BROADCAST, a["mac"], ETH_P_ARP, request)])
        deadline = time.monotonic() + a.get("seconds", 2)
        while time.monotonic() < deadline:
            try:
                data = sock.recv(2048)
            except TimeoutError:
                continue
            body = data[14:]
            if len(body) < 28:
                continue
            op = struct.unpack("!H", body[6:8])[0]
            if op == 2 and socket.inet_ntoa(body[14:18]) == a["target"]:
                return {"answer": mac_text(body[8:14])}
    finally:
        sock.close()
    return {"answer": None}


def cmd_ra(a: dict[str, Any]) -> dict[str, Any]:
    """A router advertisement from ``src_mac``'s link-local address to all nodes:
    default router for 1800 s, on-link autonomous ``prefix``/64 (SLAAC)."""
    mac = mac_bytes(a["src_mac"])
    eui64 = bytes([mac[0] ^ 2]) + mac[1:3] + b"\xff\xfe" + mac[3:]
    src = b"\xfe\x80" + b"\0" * 6 + eui64
    dst = socket.inet_pton(socket.AF_INET6, "ff02::1")
    prefix = socket.inet_pton(socket.AF_INET6, a["prefix"])
    ra = struct.pack("!BBHBBHII", 134, 0, 0, 64, 0, 1800, 0, 0)
    ra += struct.pack("!BB6s", 1, 1, mac)  # source link-layer address
    ra += struct.pack("!BBBBIII16s", 3, 4, 64, 0xC0, 86400, 14400, 0, prefix)  # prefix info
    pseudo = src + dst + struct.pack("!I3xB", len(ra), 58)
    ra = ra[:2] + struct.pack("!H", checksum(pseudo + ra)) + ra[4:]
    ip6 = struct.pack("!IHBB16s16s", 6 << 28, len(ra), 58, 255, src, dst)
    frame = ether("33:33:00:00:00:01", a["src_mac"], ETH_P_IPV6, ip6 + ra)
    return {"sent": send_frames(a["ifname"], [frame], a.get("repeat", 3))}


def cmd_vxlan(a: dict[str, Any]) -> dict[str, Any]:
    """An ICMP echo from ``inner_src`` to ``inner_dst`` (carrying ``marker``) in
    a VXLAN frame for ``vni``, sent over UDP to each of ``dsts`` port 4789."""
    echo = icmp_echo(0x4242, 1, a["marker"].encode())
    inner = ether(
        a["inner_dst_mac"],
        a["inner_src_mac"],
        ETH_P_IP,
        ipv4(a["inner_src"], a["inner_dst"], 1, echo),
    )
    payload = struct.pack("!II", 0x08000000, a["vni"] << 8) + inner
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sent = 0
    try:
        for _ in range(a.get("repeat", 3)):
            for dst in a["dsts"]:
                sock.sendto(payload, (dst, a.get("port", 4789)))
                sent += 1
            time.sleep(0.05)
    finally:
        sock.close()
    return {"sent": sent}


def cmd_syn(a: dict[str, Any]) -> dict[str, Any]:
    """A TCP SYN from ``src`` to ``dst``:``dport`` in a raw frame to ``eth_dst``
    (so the destination can be one the sender's own routing would keep, such as
    127.0.0.1); the TCP flags of the answer ("SA" for SYN-ACK, "RA" for a
    reset), or None when nothing answered."""
    sport = 40000 + (time.monotonic_ns() // 1000) % 20000
    tcp = struct.pack("!HHIIBBHHH", sport, a["dport"], 1, 0, 5 << 4, 0x02, 64240, 0, 0)
    pseudo = (
        socket.inet_aton(a["src"])
        + socket.inet_aton(a["dst"])
        + struct.pack("!BBH", 0, 6, len(tcp))
    )
    tcp = tcp[:16] + struct.pack("!H", checksum(pseudo + tcp)) + tcp[18:]
    frame = ether(a["eth_dst"], a["eth_src"], ETH_P_IP, ipv4(a["src"], a["dst"], 6, tcp))
    sock = listener(a["ifname"], ETH_P_IP)
    try:
        send_frames(a["ifname"], [frame], 2)
        deadline = time.monotonic() + a.get("seconds", 2)
        while time.monotonic() < deadline:
            try:
                data = sock.recv(4096)
            except TimeoutError:
                continue
            ip = data[14:]
            if len(ip) < 40 or ip[9] != 6 or socket.inet_ntoa(ip[12:16]) != a["dst"]:
                continue
            tcp_in = ip[(ip[0] & 15) * 4 :]
            if struct.unpack("!HH", tcp_in[:4]) != (a["dport"], sport):
                continue
            flags = tcp_in[13]
            names = "".join(n for bit, n in ((0x02, "S"), (0x04, "R"), (0x10, "A")) if flags & bit)
            return {"answer": names}
    finally:
        sock.close()
    return {"answer": None}


def cmd_sniff(a: dict[str, Any]) -> dict[str, Any]:
    """For ``seconds``: IPv4 frames from ``src`` to ``dst`` (containing ``marker``
    if given), counted per interface in ``ifnames`` (both directions)."""
    socks = {name: listener(name, ETH_P_ALL) for name in a["ifnames"]}
    counts = dict.fromkeys(socks, 0)
    marker = a.get("marker", "").encode()
    print("ready", flush=True)
    deadline = time.monotonic() + a["seconds"]
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select(list(socks.values()), [], [], 0.1)
            for name, sock in socks.items():
                if sock not in ready:
                    continue
                try:
                    data = sock.recv(65535)
                except (BlockingIOError, TimeoutError):
                    continue
                if len(data) < 34 or data[12:14] != b"\x08\x00":
                    continue
                ip = data[14:]
                src, dst = socket.inet_ntoa(ip[12:16]), socket.inet_ntoa(ip[16:20])
                if src == a["src"] and dst == a["dst"] and marker in ip:
                    counts[name] += 1
    finally:
        for sock in socks.values():
            sock.close()
    return counts


if __name__ == "__main__":
    command, args = sys.argv[1], json.loads(sys.argv[2])
    print(json.dumps(globals()[f"cmd_{command}"](args)), flush=True)
