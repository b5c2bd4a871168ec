//! Which addresses a connection made for a client may reach.
//!
//! Some URLs in a request are fetched or connected to by the engine or the server on the
//! client's behalf: the IP-Adapter style picture (`ip_adapter_style_image_url`) and the RTMP
//! push (`output_rtmp_url`). Without a rule, such a URL makes the server a proxy into its own
//! network: its loopback services, the cloud's metadata endpoint (169.254.169.254), the private
//! network behind it. [`OutboundPolicy`] is that rule, one for every outbound connection:
//!
//! * it judges the address actually connected to, after name resolution
//!   ([`OutboundPolicy::resolve`]), so that every way of writing an address (`127.1`,
//!   `2130706433`, `0x7f000001`, `[::ffff:127.0.0.1]`, a DNS name pointing inward) is judged by
//!   what it resolves to, and a name cannot pass the check with one address and be connected
//!   with another;
//! * by default only public unicast addresses pass ([`classify`] lists what is refused);
//!   [`OutboundPolicy::with_private_network`] (the engine setting `allow_private_network`, the
//!   server's `--allow-private-network`) also lets loopback, the private ranges and shared
//!   address space (CGNAT) through, for set-ups where the pictures live on the LAN. Link-local
//!   addresses, the known cloud metadata addresses, multicast, broadcast and the reserved ranges
//!   stay refused even then: no LAN picture lives there.
//!
//! A caller that connects itself checks every address it is about to connect to with
//! [`OutboundPolicy::check`] (or resolves with [`OutboundPolicy::resolve`], which returns only
//! the addresses that pass), and does the same again for every redirect it follows.

use std::fmt;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, ToSocketAddrs};

/// Which addresses outbound connections made for a client may reach. The default refuses
/// everything but public unicast addresses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct OutboundPolicy {
    allow_private_network: bool,
    /// One exact address let through whatever its class, so that tests can serve a first hop
    /// from 127.0.0.1 and still see a redirect to another loopback port refused.
    #[cfg(test)]
    exception: Option<SocketAddr>,
}

impl OutboundPolicy {
    /// Public unicast addresses only (the default; the HTTP server's unless told otherwise).
    pub const fn public_only() -> Self {
        Self::new(false)
    }

    /// Public addresses, and loopback, private and shared (CGNAT) ones too: for set-ups where
    /// what is fetched lives on the local network.
    pub const fn with_private_network() -> Self {
        Self::new(true)
    }

    /// [`with_private_network`](Self::with_private_network) when `allow_private_network`,
    /// else [`public_only`](Self::public_only).
    pub const fn new(allow_private_network: bool) -> Self {
        Self {
            allow_private_network,
            #[cfg(test)]
            exception: None,
        }
    }

    /// Whether loopback, private and shared addresses pass.
    pub fn allows_private_network(&self) -> bool {
        self.allow_private_network
    }

    /// This policy, also letting exactly `addr` through (tests only).
    #[cfg(test)]
    pub(crate) fn with_exception(mut self, addr: SocketAddr) -> Self {
        self.exception = Some(addr);
        self
    }

    /// Whether a connection to `addr` may be made.
    pub fn check(&self, addr: SocketAddr) -> Result<(), Refusal> {
        #[cfg(test)]
        if self.exception == Some(addr) {
            return Ok(());
        }
        check_ip(addr.ip(), *self)
    }

    /// Resolves `host` (a name or any address form the system resolver takes) and returns the
    /// addresses this policy lets through, in the resolver's order. Fails when resolution
    /// fails, or when it gave addresses and none passes: then the error is
    /// [`io::ErrorKind::PermissionDenied`] carrying the first [`Refusal`] (see [`refusal_in`]).
    pub fn resolve(&self, host: &str, port: u16) -> io::Result<Vec<SocketAddr>> {
        // Brackets are the URL's way of writing an IPv6 literal; getaddrinfo wants it bare.
        let bare = host
            .strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(host);
        self.filter((bare, port).to_socket_addrs()?)
    }

    /// [`resolve`](Self::resolve) for a `host:port` string (`[v6]:port` for IPv6), the form
    /// HTTP clients hand their resolvers.
    pub fn resolve_netloc(&self, netloc: &str) -> io::Result<Vec<SocketAddr>> {
        self.filter(netloc.to_socket_addrs()?)
    }

    fn filter(&self, addrs: impl Iterator<Item = SocketAddr>) -> io::Result<Vec<SocketAddr>> {
        let mut passed = Vec::new();
        let mut first_refusal = None;
        for addr in addrs {
            match self.check(addr) {
                Ok(()) => passed.push(addr),
                Err(refusal) => {
                    first_refusal.get_or_insert(refusal);
                }
            }
        }
        match (passed.is_empty(), first_refusal) {
            (true, Some(refusal)) => Err(io::Error::new(io::ErrorKind::PermissionDenied, refusal)),
            _ => Ok(passed),
        }
    }
}

/// What kind of address a refused one is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AddressClass {
    /// 127.0.0.0/8, ::1.
    Loopback,
    /// 10/8, 172.16/12, 192.168/16, fc00::/7 (unique local), fec0::/10 (old site-local),
    /// 64:ff9b:1::/48 (local NAT64).
    Private,
    /// 100.64/10, carrier-grade NAT's shared address space.
    SharedAddressSpace,
    /// 169.254/16, fe80::/10.
    LinkLocal,
    /// A cloud provider's instance metadata service outside the link-local range
    /// (fd00:ec2::254, 100.100.100.200).
    CloudMetadata,
    /// 224/4, ff00::/8.
    Multicast,
    /// 0.0.0.0, :: (which connect to this host).
    Unspecified,
    /// 255.255.255.255.
    Broadcast,
    /// 192.0.2/24, 198.51.100/24, 203.0.113/24, 2001:db8::/32, 3fff::/20.
    Documentation,
    /// Everything else that is not public unicast: 0/8, 192.0.0/24, 192.88.99/24, 198.18/15,
    /// 240/4, the IPv4-compatible ::/96, 100::/64, 2001::/23, and IPv6 outside 2000::/3.
    Reserved,
}

impl AddressClass {
    /// Whether [`OutboundPolicy::with_private_network`] lets this class through.
    pub fn is_local_network(self) -> bool {
        matches!(
            self,
            AddressClass::Loopback | AddressClass::Private | AddressClass::SharedAddressSpace
        )
    }

    /// In words: `loopback`, `private`, `link-local`, …
    pub fn as_str(self) -> &'static str {
        match self {
            AddressClass::Loopback => "loopback",
            AddressClass::Private => "private",
            AddressClass::SharedAddressSpace => "shared (carrier-grade NAT)",
            AddressClass::LinkLocal => "link-local",
            AddressClass::CloudMetadata => "cloud metadata",
            AddressClass::Multicast => "multicast",
            AddressClass::Unspecified => "unspecified",
            AddressClass::Broadcast => "broadcast",
            AddressClass::Documentation => "documentation",
            AddressClass::Reserved => "reserved",
        }
    }
}

impl fmt::Display for AddressClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a connection to an address is not made.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Refusal {
    /// The address refused.
    pub addr: IpAddr,
    /// Its class.
    pub class: AddressClass,
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} is not a public address ({}", self.addr, self.class)?;
        if self.class.is_local_network() {
            f.write_str("; allow_private_network lets it through")?;
        }
        f.write_str(")")
    }
}

impl std::error::Error for Refusal {}

/// Whether `policy` lets a connection to `ip` be made (the pure check behind
/// [`OutboundPolicy::check`]).
pub fn check_ip(ip: IpAddr, policy: OutboundPolicy) -> Result<(), Refusal> {
    match classify(ip) {
        None => Ok(()),
        Some(class) if class.is_local_network() && policy.allow_private_network => Ok(()),
        Some(class) => Err(Refusal { addr: ip, class }),
    }
}

/// The class of `ip` when it is not a public unicast address; `None` for a public one. IPv6
/// forms that carry an IPv4 address (mapped `::ffff:a.b.c.d`, translated
/// `::ffff:0:a.b.c.d`, NAT64 `64:ff9b::/96`, 6to4 `2002::/16`) are judged by that address.
pub fn classify(ip: IpAddr) -> Option<AddressClass> {
    match ip {
        IpAddr::V4(v4) => classify_v4(v4),
        IpAddr::V6(v6) => classify_v6(v6),
    }
}

/// IPv4 ranges that are not public unicast, the more specific before the ranges holding them.
const V4_RANGES: &[([u8; 4], u8, AddressClass)] = &[
    ([100, 100, 100, 200], 32, AddressClass::CloudMetadata),
    ([0, 0, 0, 0], 32, AddressClass::Unspecified),
    ([255, 255, 255, 255], 32, AddressClass::Broadcast),
    ([0, 0, 0, 0], 8, AddressClass::Reserved),
    ([10, 0, 0, 0], 8, AddressClass::Private),
    ([100, 64, 0, 0], 10, AddressClass::SharedAddressSpace),
    ([127, 0, 0, 0], 8, AddressClass::Loopback),
    ([169, 254, 0, 0], 16, AddressClass::LinkLocal),
    ([172, 16, 0, 0], 12, AddressClass::Private),
    ([192, 0, 0, 0], 24, AddressClass::Reserved),
    ([192, 0, 2, 0], 24, AddressClass::Documentation),
    ([192, 88, 99, 0], 24, AddressClass::Reserved),
    ([192, 168, 0, 0], 16, AddressClass::Private),
    ([198, 18, 0, 0], 15, AddressClass::Reserved),
    ([198, 51, 100, 0], 24, AddressClass::Documentation),
    ([203, 0, 113, 0], 24, AddressClass::Documentation),
    ([224, 0, 0, 0], 4, AddressClass::Multicast),
    ([240, 0, 0, 0], 4, AddressClass::Reserved),
];

fn classify_v4(ip: Ipv4Addr) -> Option<AddressClass> {
    let bits = u32::from(ip);
    V4_RANGES.iter().find_map(|(net, len, class)| {
        let mask = u32::MAX.checked_shl(32 - u32::from(*len)).unwrap_or(0);
        (bits & mask == u32::from_be_bytes(*net)).then_some(*class)
    })
}

/// IPv6 ranges that are not public unicast (beyond those carrying an IPv4 address).
const V6_RANGES: &[(u128, u8, AddressClass)] = &[
    (
        0xfd00_0ec2_0000_0000_0000_0000_0000_0254,
        128,
        AddressClass::CloudMetadata,
    ),
    (0, 128, AddressClass::Unspecified),
    (1, 128, AddressClass::Loopback),
    // IPv4-compatible (::a.b.c.d), deprecated since 2006: nothing public is written so.
    (0, 96, AddressClass::Reserved),
    (0x0064_ff9b_0001 << 80, 48, AddressClass::Private),
    (0x0100 << 112, 64, AddressClass::Reserved),
    (0x2001_0db8 << 96, 32, AddressClass::Documentation),
    // IETF protocol assignments: Teredo, benchmarking, ORCHID and the like.
    (0x2001 << 112, 23, AddressClass::Reserved),
    (0x3fff << 112, 20, AddressClass::Documentation),
    (0xfc00 << 112, 7, AddressClass::Private),
    (0xfe80 << 112, 10, AddressClass::LinkLocal),
    (0xfec0 << 112, 10, AddressClass::Private),
    (0xff00 << 112, 8, AddressClass::Multicast),
];

fn classify_v6(ip: Ipv6Addr) -> Option<AddressClass> {
    let bits = u128::from(ip);
    let embedded = |shift: u32| Ipv4Addr::from((bits >> shift) as u32);
    let within = |net: u128, len: u32| bits & (u128::MAX << (128 - len)) == net;
    // ::ffff:a.b.c.d (mapped), ::ffff:0:a.b.c.d (translated), 64:ff9b::a.b.c.d (NAT64) and
    // 2002:aabb:ccdd::/48 (6to4) reach the IPv4 address they carry.
    if within(0xffff << 32, 96) || within(0xffff << 48, 96) || within(0x0064_ff9b << 96, 96) {
        return classify_v4(embedded(0));
    }
    if within(0x2002 << 112, 16) {
        return classify_v4(embedded(80));
    }
    V6_RANGES
        .iter()
        .find_map(|(net, len, class)| within(*net, u32::from(*len)).then_some(*class))
        .or_else(|| {
            // Global unicast is 2000::/3; nothing else is routed on the internet.
            (!within(0x2000 << 112, 3)).then_some(AddressClass::Reserved)
        })
}

/// The [`Refusal`] an error (or any error in its chain, `io::Error`'s inner one included)
/// carries, if it came from an [`OutboundPolicy`].
pub fn refusal_in(error: &(dyn std::error::Error + 'static)) -> Option<Refusal> {
    let mut next = Some(error);
    while let Some(e) = next {
        if let Some(refusal) = e.downcast_ref::<Refusal>() {
            return Some(*refusal);
        }
        // io::Error's source() skips the error it wraps.
        if let Some(inner) = e
            .downcast_ref::<io::Error>()
            .and_then(io::Error::get_ref)
            .and_then(|inner| inner.downcast_ref::<Refusal>())
        {
            return Some(*inner);
        }
        next = e.source();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn class(text: &str) -> Option<AddressClass> {
        classify(text.parse().expect(text))
    }

    #[test]
    fn every_non_public_range_is_classified_and_public_addresses_pass() {
        use AddressClass::*;
        let cases: &[(&str, Option<AddressClass>)] = &[
            ("8.8.8.8", None),
            ("1.1.1.1", None),
            ("172.32.0.1", None),
            ("100.128.0.1", None),
            ("2606:4700:4700::1111", None),
            ("::ffff:8.8.8.8", None),
            ("64:ff9b::808:808", None),
            ("2002:808:808::1", None),
            ("127.0.0.1", Some(Loopback)),
            ("127.255.255.254", Some(Loopback)),
            ("::1", Some(Loopback)),
            ("::ffff:127.0.0.1", Some(Loopback)),
            ("::ffff:0:127.0.0.1", Some(Loopback)),
            ("64:ff9b::7f00:1", Some(Loopback)),
            ("2002:7f00:1::1", Some(Loopback)),
            ("10.0.0.1", Some(Private)),
            ("172.16.0.1", Some(Private)),
            ("172.31.255.255", Some(Private)),
            ("192.168.1.1", Some(Private)),
            ("fd00::1", Some(Private)),
            ("fc00::1", Some(Private)),
            ("fec0::1", Some(Private)),
            ("64:ff9b:1::1", Some(Private)),
            ("::ffff:10.1.2.3", Some(Private)),
            ("2002:c0a8:101::1", Some(Private)),
            ("100.64.0.1", Some(SharedAddressSpace)),
            ("100.127.255.255", Some(SharedAddressSpace)),
            ("169.254.169.254", Some(LinkLocal)),
            ("fe80::1", Some(LinkLocal)),
            ("::ffff:169.254.169.254", Some(LinkLocal)),
            ("fd00:ec2::254", Some(CloudMetadata)),
            ("100.100.100.200", Some(CloudMetadata)),
            ("224.0.0.1", Some(Multicast)),
            ("239.255.255.250", Some(Multicast)),
            ("ff02::1", Some(Multicast)),
            ("0.0.0.0", Some(Unspecified)),
            ("::", Some(Unspecified)),
            ("::ffff:0.0.0.0", Some(Unspecified)),
            ("255.255.255.255", Some(Broadcast)),
            ("0.1.2.3", Some(Reserved)),
            ("192.0.0.8", Some(Reserved)),
            ("192.88.99.1", Some(Reserved)),
            ("198.18.0.1", Some(Reserved)),
            ("198.19.255.255", Some(Reserved)),
            ("240.0.0.1", Some(Reserved)),
            ("::127.0.0.1", Some(Reserved)),
            ("::8.8.8.8", Some(Reserved)),
            ("100::1", Some(Reserved)),
            ("2001::1", Some(Reserved)),
            ("2001:1ff::1", Some(Reserved)),
            ("4000::1", Some(Reserved)),
            ("192.0.2.1", Some(Documentation)),
            ("198.51.100.1", Some(Documentation)),
            ("203.0.113.1", Some(Documentation)),
            ("2001:db8::1", Some(Documentation)),
            ("3fff::1", Some(Documentation)),
        ];
        let wrong: Vec<String> = cases
            .iter()
            .filter(|(text, want)| class(text) != *want)
            .map(|(text, want)| format!("{text}: {:?}, want {want:?}", class(text)))
            .collect();
        assert!(wrong.is_empty(), "{wrong:#?}");
        assert_eq!(cases.len(), 56);
    }

    #[test]
    fn the_lan_flag_lets_loopback_and_private_through_but_never_link_local_or_metadata() {
        let lan = OutboundPolicy::with_private_network();
        let public = OutboundPolicy::public_only();
        assert_eq!(public, OutboundPolicy::default());
        for ok in [
            "127.0.0.1",
            "::1",
            "10.0.0.1",
            "192.168.0.7",
            "fd00::1",
            "100.64.1.1",
        ] {
            let ip: IpAddr = ok.parse().unwrap();
            assert_eq!(check_ip(ip, lan), Ok(()), "{ok}");
            let refusal = check_ip(ip, public).expect_err(ok);
            assert!(
                refusal.to_string().contains("allow_private_network"),
                "{refusal}"
            );
        }
        for never in [
            "169.254.169.254",
            "fe80::1",
            "fd00:ec2::254",
            "100.100.100.200",
            "0.0.0.0",
            "::",
            "224.0.0.1",
            "255.255.255.255",
            "240.0.0.1",
        ] {
            let ip: IpAddr = never.parse().unwrap();
            let refusal = check_ip(ip, lan).expect_err(never);
            assert!(!refusal.class.is_local_network(), "{never}: {refusal}");
        }
        assert_eq!(check_ip("8.8.8.8".parse().unwrap(), public), Ok(()));
    }

    #[test]
    fn resolution_is_judged_on_every_address_form_and_the_refusal_survives_io_error() {
        let public = OutboundPolicy::public_only();
        // Forms getaddrinfo accepts for 127.0.0.1, and a name.
        for host in [
            "127.0.0.1",
            "127.1",
            "2130706433",
            "0x7f000001",
            "localhost",
            "[::1]",
        ] {
            let err = public.resolve(host, 80).expect_err(host);
            assert_eq!(err.kind(), io::ErrorKind::PermissionDenied, "{host}: {err}");
            let refusal = refusal_in(&err).expect(host);
            assert_eq!(refusal.class, AddressClass::Loopback, "{host}");
        }
        let err = public
            .resolve_netloc("[::ffff:127.0.0.1]:8080")
            .unwrap_err();
        assert_eq!(refusal_in(&err).unwrap().class, AddressClass::Loopback);
        let lan = OutboundPolicy::with_private_network();
        assert_eq!(
            lan.resolve("127.1", 80).unwrap(),
            vec![SocketAddr::from(([127, 0, 0, 1], 80))]
        );
        // An exception lets one exact address through and no other port.
        let first = SocketAddr::from(([127, 0, 0, 1], 4000));
        let excepted = public.with_exception(first);
        assert_eq!(excepted.check(first), Ok(()));
        assert!(
            excepted
                .check(SocketAddr::from(([127, 0, 0, 1], 4001)))
                .is_err()
        );
    }
}
