//! SCRAM-SHA-256 (RFC 5802, RFC 7677) as PostgreSQL speaks it: bulkhead as the server toward
//! clients, and as a client toward servers with the keys a client's proof revealed. Pure: the
//! caller moves the messages. The primitives (HMAC, SHA-256) are ring's.

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use std::fmt::Write as _;
use std::ops::Range;
use std::sync::Arc;

use ring::{digest, hmac};

/// A SCRAM-SHA-256 verifier, as `pg_authid.rolpassword` and PgBouncer's users file keep it:
/// `SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>`. Shared, not copied, by the
/// logins that use it, with the HMAC keys and the salt's base64 worked out once.
#[derive(Clone)]
pub struct Verifier(Arc<Keys>);

struct Keys {
    iterations: u32,
    salt: Vec<u8>,
    salt_b64: String,
    stored_key: [u8; 32],
    server_key: [u8; 32],
    stored_hmac: hmac::Key,
    server_hmac: hmac::Key,
}

impl PartialEq for Verifier {
    fn eq(&self, other: &Self) -> bool {
        let (a, b) = (&*self.0, &*other.0);
        a.iterations == b.iterations
            && a.salt == b.salt
            && a.stored_key == b.stored_key
            && a.server_key == b.server_key
    }
}

impl Eq for Verifier {}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Verifier(..)")
    }
}

impl Verifier {
    fn new(iterations: u32, salt: Vec<u8>, stored_key: [u8; 32], server_key: [u8; 32]) -> Self {
        Verifier(Arc::new(Keys {
            iterations,
            salt_b64: B64.encode(&salt),
            salt,
            stored_key,
            server_key,
            stored_hmac: hmac::Key::new(hmac::HMAC_SHA256, &stored_key),
            server_hmac: hmac::Key::new(hmac::HMAC_SHA256, &server_key),
        }))
    }

    /// Parses the text form; `None` if it is not one.
    pub fn parse(text: &str) -> Option<Verifier> {
        let rest = text.strip_prefix("SCRAM-SHA-256$")?;
        let (iter_salt, keys) = rest.split_once('$')?;
        let (iterations, salt) = iter_salt.split_once(':')?;
        let (stored, server) = keys.split_once(':')?;
        Some(Verifier::new(
            iterations.parse().ok().filter(|&i| i > 0)?,
            B64.decode(salt).ok()?,
            B64.decode(stored).ok()?.try_into().ok()?,
            B64.decode(server).ok()?.try_into().ok()?,
        ))
    }

    /// The verifier of a password, with a fresh random salt (the password SASLprep'd as
    /// PostgreSQL does).
    pub fn from_password(password: &str) -> Verifier {
        Verifier::parse(&postgres_protocol::password::scram_sha_256(
            password.as_bytes(),
        ))
        .expect("postgres-protocol writes valid verifiers")
    }

    /// A verifier no password matches, the same for the same name: an unknown user goes
    /// through the whole exchange and fails at its end, as with PostgreSQL, so the answer does
    /// not tell whether the user exists.
    pub fn mock(name: &str, key: &[u8; 32]) -> Verifier {
        let tag = hmac::sign(&hmac::Key::new(hmac::HMAC_SHA256, key), name.as_bytes());
        let mut stored_key = [0; 32];
        stored_key.copy_from_slice(tag.as_ref());
        Verifier::new(4096, tag.as_ref()[..16].to_vec(), stored_key, stored_key)
    }

    pub fn iterations(&self) -> u32 {
        self.0.iterations
    }

    pub fn salt(&self) -> &[u8] {
        &self.0.salt
    }
}

/// HMAC-SHA-256 of `data` with a key set up once.
fn sign(key: &hmac::Key, data: &[u8]) -> [u8; 32] {
    let mut out = [0; 32];
    out.copy_from_slice(hmac::sign(key, data).as_ref());
    out
}

fn sha256(data: &[u8]) -> [u8; 32] {
    let mut out = [0; 32];
    out.copy_from_slice(digest::digest(&digest::SHA256, data).as_ref());
    out
}

/// Whether two byte strings are equal, looking at every byte whatever the first difference.
pub fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn xor(a: &[u8; 32], b: &[u8; 32]) -> [u8; 32] {
    let mut out = [0; 32];
    for i in 0..32 {
        out[i] = a[i] ^ b[i];
    }
    out
}

/// Appends a fresh nonce: 18 random bytes in base64, as PostgreSQL makes them.
fn push_nonce(out: &mut String) {
    let mut raw = [0u8; 18];
    getrandom::fill(&mut raw).expect("the system's random source works");
    B64.encode_string(raw, out);
}

/// The tls-server-end-point channel binding data of a certificate (RFC 5929): its hash with
/// the hash of its signature algorithm, SHA-256 for MD5 and SHA-1 signatures.
pub fn server_end_point(certificate_der: &[u8]) -> Vec<u8> {
    // The OIDs of sha384/sha512 with RSA, RSA-PSS is left to SHA-256, and ECDSA.
    const SHA384: [&[u8]; 2] = [
        &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x0c],
        &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x03],
    ];
    const SHA512: [&[u8]; 2] = [
        &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x0d],
        &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x04],
    ];
    // The outer signatureAlgorithm is among the certificate's last bytes (before the
    // signature itself, at most 512 bytes for RSA-4096).
    let tail = &certificate_der[certificate_der.len().saturating_sub(600)..];
    let has = |oid: &[u8]| tail.windows(oid.len()).any(|w| w == oid);
    let algorithm = if SHA512.iter().any(|o| has(o)) {
        &digest::SHA512
    } else if SHA384.iter().any(|o| has(o)) {
        &digest::SHA384
    } else {
        &digest::SHA256
    };
    digest::digest(algorithm, certificate_der).as_ref().to_vec()
}

/// Why an exchange failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// The proof did not match: a wrong password (or an unknown user). 28P01.
    Password,
    /// The messages were malformed or out of the rules. 08P01.
    Protocol(String),
}

fn protocol(why: &str) -> Failure {
    Failure::Protocol(why.to_string())
}

/// One exchange with a client, bulkhead as the server.
pub struct ServerExchange {
    verifier: Verifier,
    /// The channel binding data of the certificate this connection presented, if it is TLS.
    binding: Option<Vec<u8>>,
    /// The AuthMessage as far as it is known: client-first-bare "," server-first ",".
    auth: String,
    /// Where the server-first message and, within it, the combined nonce are in `auth`.
    server_first: Range<usize>,
    nonce: Range<usize>,
    /// The gs2 header the client sent, which its final message must repeat (in base64).
    gs2_header: &'static str,
    plus: bool,
}

/// What a successful exchange leaves: the server-final message and the client's key.
pub struct Proven {
    pub server_final: String,
    pub client_key: [u8; 32],
}

impl ServerExchange {
    /// Starts with the client's SASLInitialResponse: the mechanism it chose and its first
    /// message. The server-first message to send is then `server_first()`.
    pub fn start(
        verifier: Verifier,
        binding: Option<Vec<u8>>,
        mechanism: &[u8],
        client_first: &[u8],
    ) -> Result<ServerExchange, Failure> {
        let plus = match mechanism {
            b"SCRAM-SHA-256" => false,
            b"SCRAM-SHA-256-PLUS" if binding.is_some() => true,
            _ => {
                return Err(protocol(
                    "the client chose a SASL mechanism that was not offered",
                ));
            }
        };
        let text = std::str::from_utf8(client_first)
            .map_err(|_| protocol("the SCRAM client-first message is not UTF-8"))?;
        // gs2-header: cbind-flag "," [authzid] ","
        let (flag, rest) = text
            .split_once(',')
            .ok_or_else(|| protocol("malformed SCRAM client-first message"))?;
        let (authzid, bare) = rest
            .split_once(',')
            .ok_or_else(|| protocol("malformed SCRAM client-first message"))?;
        if !authzid.is_empty() {
            return Err(protocol("SCRAM authorization identities are not supported"));
        }
        let gs2_header = match flag {
            "p=tls-server-end-point" if plus => "p=tls-server-end-point,,",
            "n" if !plus => "n,,",
            // The client could bind but believed the server cannot, though this connection
            // offered -PLUS: a downgrade, as PostgreSQL judges it.
            "y" if !plus && binding.is_none() => "y,,",
            "y" => {
                return Err(protocol(
                    "SCRAM channel binding negotiation error: the client supports binding but the server offered it",
                ));
            }
            _ => {
                return Err(protocol(
                    "the SCRAM channel binding flag does not match the mechanism",
                ));
            }
        };
        // client-first-bare: [reserved-mext ","] username "," nonce ["," extensions]
        let mut client_nonce = None;
        for attr in bare.split(',') {
            if let Some(v) = attr.strip_prefix("r=") {
                client_nonce = Some(v);
            } else if attr.starts_with("m=") {
                return Err(protocol("SCRAM extensions are not supported"));
            }
        }
        let client_nonce = client_nonce
            .filter(|n| !n.is_empty() && n.bytes().all(|b| (0x21..=0x7e).contains(&b) && b != b','))
            .ok_or_else(|| protocol("the SCRAM client-first message has no valid nonce"))?;
        // The final message adds about as much again as the first two.
        let mut auth = String::with_capacity(2 * (bare.len() + 100));
        auth.push_str(bare);
        auth.push(',');
        let first_at = auth.len();
        auth.push_str("r=");
        let nonce_at = auth.len();
        auth.push_str(client_nonce);
        push_nonce(&mut auth);
        let nonce = nonce_at..auth.len();
        auth.push_str(",s=");
        auth.push_str(&verifier.0.salt_b64);
        let _ = write!(auth, ",i={}", verifier.0.iterations);
        let server_first = first_at..auth.len();
        auth.push(',');
        Ok(ServerExchange {
            verifier,
            binding: if plus { binding } else { None },
            auth,
            server_first,
            nonce,
            gs2_header,
            plus,
        })
    }

    /// The server-first message to send.
    pub fn server_first(&self) -> &str {
        &self.auth[self.server_first.clone()]
    }

    /// Checks the client-final message. On success, the server-final message to send and the
    /// ClientKey the proof revealed.
    pub fn finish(mut self, client_final: &[u8]) -> Result<Proven, Failure> {
        let text = std::str::from_utf8(client_final)
            .map_err(|_| protocol("the SCRAM client-final message is not UTF-8"))?;
        let (without_proof, proof) = text
            .rsplit_once(",p=")
            .ok_or_else(|| protocol("the SCRAM client-final message has no proof"))?;
        let mut binding = None;
        let mut nonce = None;
        for attr in without_proof.split(',') {
            if let Some(v) = attr.strip_prefix("c=") {
                binding = Some(v);
            } else if let Some(v) = attr.strip_prefix("r=") {
                nonce = Some(v);
            }
        }
        let binding = binding
            .ok_or_else(|| protocol("the SCRAM client-final message has no channel binding"))?;
        // The gs2 header again, then the binding data for -PLUS: at most a SHA-512 hash.
        let mut decoded = [0u8; 128];
        let len = B64
            .decode_slice(binding, &mut decoded)
            .map_err(|_| protocol("malformed SCRAM channel binding"))?;
        let (header, data) = decoded[..len].split_at(self.gs2_header.len().min(len));
        let data_expected = if self.plus {
            self.binding.as_deref().unwrap_or_default()
        } else {
            &[]
        };
        if header != self.gs2_header.as_bytes() || data != data_expected {
            return Err(protocol("SCRAM channel binding check failed"));
        }
        if nonce != Some(&self.auth[self.nonce.clone()]) {
            return Err(protocol("the SCRAM nonce does not match"));
        }
        let mut raw_proof = [0u8; 48];
        let proof: [u8; 32] = B64
            .decode_slice(proof, &mut raw_proof)
            .ok()
            .and_then(|n| raw_proof[..n].try_into().ok())
            .ok_or_else(|| protocol("malformed SCRAM proof"))?;
        self.auth.push_str(without_proof);
        let keys = &self.verifier.0;
        let signature = sign(&keys.stored_hmac, self.auth.as_bytes());
        let client_key = xor(&proof, &signature);
        if !same(&sha256(&client_key), &keys.stored_key) {
            return Err(Failure::Password);
        }
        let mut server_final = String::with_capacity(48);
        server_final.push_str("v=");
        B64.encode_string(
            sign(&keys.server_hmac, self.auth.as_bytes()),
            &mut server_final,
        );
        Ok(Proven {
            server_final,
            client_key,
        })
    }
}

/// SCRAM toward a server with the keys a client revealed instead of a password: the salt and
/// iteration count the server sends must be the verifier's (the server keeps the same one).
pub struct KeyedClient {
    client_key: [u8; 32],
    verifier: Verifier,
    client_first_bare: String,
    nonce: String,
    auth_message: String,
}

impl KeyedClient {
    /// The SASLInitialResponse data: `n,,n=,r=<nonce>`.
    pub fn start(client_key: [u8; 32], verifier: Verifier) -> (KeyedClient, String) {
        let mut nonce = String::with_capacity(24);
        push_nonce(&mut nonce);
        let client_first_bare = format!("n=,r={nonce}");
        let first = format!("n,,{client_first_bare}");
        (
            KeyedClient {
                client_key,
                verifier,
                client_first_bare,
                nonce,
                auth_message: String::new(),
            },
            first,
        )
    }

    /// Answers the server-first message with the client-final one.
    pub fn respond(&mut self, server_first: &[u8]) -> Result<String, Failure> {
        let text = std::str::from_utf8(server_first)
            .map_err(|_| protocol("the server's SCRAM message is not UTF-8"))?;
        let (mut nonce, mut salt, mut iterations) = (None, None, None);
        for attr in text.split(',') {
            if let Some(v) = attr.strip_prefix("r=") {
                nonce = Some(v);
            } else if let Some(v) = attr.strip_prefix("s=") {
                salt = B64.decode(v).ok();
            } else if let Some(v) = attr.strip_prefix("i=") {
                iterations = v.parse::<u32>().ok();
            }
        }
        let nonce = nonce
            .filter(|n| n.starts_with(&self.nonce))
            .ok_or_else(|| protocol("the server's SCRAM nonce does not extend bulkhead's"))?;
        if salt.as_deref() != Some(self.verifier.salt())
            || iterations != Some(self.verifier.iterations())
        {
            return Err(protocol(
                "the server keeps a different SCRAM verifier for this user than bulkhead's users file or auth query",
            ));
        }
        let without_proof = format!("c=biws,r={nonce}");
        self.auth_message = format!("{},{},{}", self.client_first_bare, text, without_proof);
        let signature = sign(&self.verifier.0.stored_hmac, self.auth_message.as_bytes());
        let proof = xor(&self.client_key, &signature);
        Ok(format!("{without_proof},p={}", B64.encode(proof)))
    }

    /// Checks the server-final message: the server knew the verifier too.
    pub fn verify(&self, server_final: &[u8]) -> Result<(), Failure> {
        let expected = format!(
            "v={}",
            B64.encode(sign(
                &self.verifier.0.server_hmac,
                self.auth_message.as_bytes()
            ))
        );
        if server_final == expected.as_bytes() {
            Ok(())
        } else {
            Err(protocol("the server's SCRAM signature is wrong"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};

    /// Runs postgres-protocol's client (what tokio-postgres uses) against the server side.
    fn exchange(
        password: &str,
        verifier: &Verifier,
        binding: Option<Vec<u8>>,
        client_binding: ChannelBinding,
        mechanism: &[u8],
    ) -> Result<[u8; 32], Failure> {
        let mut client = ScramSha256::new(password.as_bytes(), client_binding);
        let server = ServerExchange::start(verifier.clone(), binding, mechanism, client.message())?;
        client
            .update(server.server_first().as_bytes())
            .map_err(|e| Failure::Protocol(e.to_string()))?;
        let proven = server.finish(client.message())?;
        client
            .finish(proven.server_final.as_bytes())
            .expect("the client accepts the server's signature");
        Ok(proven.client_key)
    }

    #[test]
    fn a_real_client_logs_in_with_the_right_password_and_not_with_a_wrong_one() {
        let v = Verifier::from_password("sekret");
        let plain = ChannelBinding::unrequested;
        assert!(exchange("sekret", &v, None, plain(), b"SCRAM-SHA-256").is_ok());
        assert_eq!(
            exchange("wrong", &v, None, plain(), b"SCRAM-SHA-256").err(),
            Some(Failure::Password)
        );
    }

    #[test]
    fn channel_binding_checks_the_certificate_hash() {
        let v = Verifier::from_password("pw");
        let cert = b"certificate".to_vec();
        let hash = server_end_point(&cert);
        let ok = exchange(
            "pw",
            &v,
            Some(hash.clone()),
            ChannelBinding::tls_server_end_point(hash.clone()),
            b"SCRAM-SHA-256-PLUS",
        );
        assert!(ok.is_ok());
        let wrong = exchange(
            "pw",
            &v,
            Some(hash),
            ChannelBinding::tls_server_end_point(vec![1, 2, 3]),
            b"SCRAM-SHA-256-PLUS",
        );
        assert!(matches!(wrong, Err(Failure::Protocol(_))));
        // A client that could bind ('y') on a connection that offered -PLUS: a downgrade.
        let downgrade = exchange(
            "pw",
            &v,
            Some(vec![9; 32]),
            ChannelBinding::unrequested(),
            b"SCRAM-SHA-256",
        );
        assert!(matches!(downgrade, Err(Failure::Protocol(_))));
        // One that cannot bind ('n') is fine: it chose plain SCRAM knowingly.
        let plain = exchange(
            "pw",
            &v,
            Some(vec![9; 32]),
            ChannelBinding::unsupported(),
            b"SCRAM-SHA-256",
        );
        assert!(plain.is_ok());
    }

    #[test]
    fn the_revealed_client_key_logs_in_to_a_server_with_the_same_verifier() {
        let v = Verifier::from_password("pw");
        let key = exchange(
            "pw",
            &v,
            None,
            ChannelBinding::unrequested(),
            b"SCRAM-SHA-256",
        )
        .unwrap();
        // bulkhead logs in as a client with that key; the "server" is the same verifier.
        let (mut client, first) = KeyedClient::start(key, v.clone());
        let server =
            ServerExchange::start(v.clone(), None, b"SCRAM-SHA-256", first.as_bytes()).unwrap();
        let fin = client.respond(server.server_first().as_bytes()).unwrap();
        let proven = server.finish(fin.as_bytes()).unwrap();
        client.verify(proven.server_final.as_bytes()).unwrap();
        // A server with another verifier (another salt) is refused before any proof is sent.
        let other = Verifier::from_password("pw");
        let (mut client, first) = KeyedClient::start(key, v);
        let server =
            ServerExchange::start(other, None, b"SCRAM-SHA-256", first.as_bytes()).unwrap();
        assert!(client.respond(server.server_first().as_bytes()).is_err());
    }

    #[test]
    fn malformed_final_messages_are_protocol_errors() {
        let v = Verifier::from_password("pw");
        let start =
            || ServerExchange::start(v.clone(), None, b"SCRAM-SHA-256", b"n,,n=,r=abc").unwrap();
        let nonce =
            |s: &ServerExchange| s.server_first()[2..].split(',').next().unwrap().to_string();
        // Which check refused it: the protocol error's words.
        let refused_for = |result: Result<Proven, Failure>, why: &str| match result {
            Err(Failure::Protocol(text)) => assert!(text.contains(why), "{text:?} for {why:?}"),
            Err(Failure::Password) => panic!("a password failure, expected {why:?}"),
            Ok(_) => panic!("accepted, expected {why:?}"),
        };
        let good_proof = B64.encode([0u8; 32]);
        // A channel binding longer than any the exchange could expect (the decoding buffer
        // holds 128 bytes), with an otherwise well-formed message.
        let server = start();
        let n = nonce(&server);
        let long = B64.encode([b'n'; 200]);
        refused_for(
            server.finish(format!("c={long},r={n},p={good_proof}").as_bytes()),
            "channel binding",
        );
        // A proof that is not 32 bytes, shorter or longer, or not base64.
        for proof in [
            B64.encode([0u8; 31]),
            B64.encode([0u8; 33]),
            "!!".to_string(),
        ] {
            let server = start();
            let n = nonce(&server);
            refused_for(
                server.finish(format!("c=biws,r={n},p={proof}").as_bytes()),
                "malformed SCRAM proof",
            );
        }
        // The right shape with a wrong nonce, then with a wrong proof.
        refused_for(
            start().finish(format!("c=biws,r=abcX,p={good_proof}").as_bytes()),
            "nonce",
        );
        let server = start();
        let n = nonce(&server);
        let result = server.finish(format!("c=biws,r={n},p={good_proof}").as_bytes());
        assert_eq!(result.err(), Some(Failure::Password));
    }

    #[test]
    fn an_unknown_user_fails_like_a_wrong_password() {
        let v = Verifier::mock("nobody", &[7; 32]);
        assert_eq!(v, Verifier::mock("nobody", &[7; 32]));
        assert_eq!(
            exchange(
                "x",
                &v,
                None,
                ChannelBinding::unrequested(),
                b"SCRAM-SHA-256"
            )
            .err(),
            Some(Failure::Password)
        );
    }

    #[test]
    fn verifiers_parse_as_postgresql_writes_them() {
        let text = postgres_protocol::password::scram_sha_256(b"pw");
        let v = Verifier::parse(&text).unwrap();
        assert_eq!(v.iterations(), 4096);
        assert_eq!(v.salt().len(), 16);
        assert!(Verifier::parse("md5abc").is_none());
        assert!(Verifier::parse("SCRAM-SHA-256$0:AAAA$AAAA:AAAA").is_none());
    }
}
