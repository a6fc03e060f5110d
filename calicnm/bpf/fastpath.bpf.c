// SPDX-License-Identifier: GPL-2.0
/*
 * calicnm's same-host fast path: a tc ingress program on the host side of each
 * container veth.  A packet from one local container to another is handed straight
 * to the destination container's interface (bpf_redirect_peer) when, and only when,
 * the agent has put both addresses in the same "open group": the first profile of
 * each endpoint allows everything outbound and everything inbound from a tag both
 * carry, so policy allows every packet between them in both directions, with or
 * without connection state.  Everything else (other pairs, a source address that is
 * not the sending interface's, IP options, an expiring TTL, non-IPv4) goes on to the
 * host's stack and its iptables policy unchanged.
 *
 * Map layout (the agent writes it; see calicnm/host/fastpath.py):
 *   calicnm_eps   hash   IPv4 address (network order) -> struct calicnm_ep
 *   calicnm_stats array  [0] packets redirected, [1] packets passed to the stack
 */
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/ip.h>
#include <linux/pkt_cls.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

struct calicnm_ep {
	__u32 ifindex;       /* host side of the endpoint's veth */
	__u32 group;         /* open group; 0 never redirects */
	__u8 mac[ETH_ALEN];  /* the container's MAC */
	__u8 host_mac[ETH_ALEN]; /* the host side's MAC: the gateway, as the container sees it */
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__type(key, __u32);
	__type(value, struct calicnm_ep);
} calicnm_eps SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 2);
	__type(key, __u32);
	__type(value, __u64);
} calicnm_stats SEC(".maps");

static __always_inline int pass(void)
{
	__u32 key = 1;
	__u64 *count = bpf_map_lookup_elem(&calicnm_stats, &key);

	if (count)
		*count += 1;
	return TC_ACT_OK;
}

static __always_inline int same_mac(const __u8 *a, const __u8 *b)
{
	__u8 diff = 0;

#pragma unroll
	for (int i = 0; i < ETH_ALEN; i++)
		diff |= a[i] ^ b[i];
	return diff == 0;
}

SEC("tc")
int calicnm_fast(struct __sk_buff *skb)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	struct iphdr *ip = data + sizeof(*eth);
	struct calicnm_ep *src, *dst;
	__u32 saddr, daddr, key = 0;
	__u64 *count;
	__u32 sum;

	if ((void *)(ip + 1) > data_end)
		return TC_ACT_OK;
	if (eth->h_proto != bpf_htons(ETH_P_IP) || ip->ihl != 5 || ip->ttl <= 1)
		return pass();
	saddr = ip->saddr;
	daddr = ip->daddr;
	/* The destination first: traffic to other hosts costs one lookup. */
	dst = bpf_map_lookup_elem(&calicnm_eps, &daddr);
	if (!dst || dst->group == 0 || dst->ifindex == skb->ifindex)
		return pass();
	src = bpf_map_lookup_elem(&calicnm_eps, &saddr);
	if (!src || src->group != dst->group || src->ifindex != skb->ifindex)
		return pass();
	if (!same_mac(eth->h_dest, src->host_mac))
		return pass();

	/* A routed hop: TTL down by one, the header checksum fixed incrementally. */
	ip->ttl -= 1;
	sum = (__u32)ip->check + (__u32)bpf_htons(0x0100);
	ip->check = (__u16)(sum + (sum >= 0xFFFF));
	__builtin_memcpy(eth->h_dest, dst->mac, ETH_ALEN);
	__builtin_memcpy(eth->h_source, dst->host_mac, ETH_ALEN);

	count = bpf_map_lookup_elem(&calicnm_stats, &key);
	if (count)
		*count += 1;
	return bpf_redirect_peer(dst->ifindex, 0);
}

char LICENSE[] SEC("license") = "GPL";
